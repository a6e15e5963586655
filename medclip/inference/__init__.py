"""Using a trained model: embedding images and texts, an embedding index, search and ranking."""
