"""Named prompt sets for zero-shot classification (`medclip zeroshot` and `medclip evaluate --prompt_set NAME`): a
class is scored by the mean of its prompts' embeddings, so which prompts a paper used is part of its protocol.

- ``radiology``: our default, five radiology phrasings (no paper's).
- ``clip``: CLIP's 80 ImageNet templates (OpenAI's Prompt_Engineering_for_ImageNet notebook; open_clip's
  ``OPENAI_IMAGENET_TEMPLATES``), in their order.
- ``biomedclip``: "this is a photo of {}", as BiomedCLIP's model card prompts its zero-shot example.
- ``clip-tf-report``: "A photo of a {}.", the CLIP TensorFlow & ROCO report's zero-shot prompt ("A photo of a
  {label}.").
"""

from __future__ import annotations

RADIOLOGY_TEMPLATES = (
    "a radiology image showing {}.",
    "a {} scan.",
    "a medical image of {}.",
    "an image showing {}.",
    "{}.",
)

OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "radiology": RADIOLOGY_TEMPLATES,
    "clip": OPENAI_IMAGENET_TEMPLATES,
    "biomedclip": ("this is a photo of {}",),
    "clip-tf-report": ("A photo of a {}.",),
}
DEFAULT_PROMPT_SET = "radiology"


class PromptSetError(ValueError):
    """A prompt-set name that is not one of `PROMPT_SETS`."""


def prompt_set(name: str) -> tuple[str, ...]:
    """The templates (each with one "{}" for the class name) of a named set."""
    try:
        return PROMPT_SETS[name]
    except KeyError:
        raise PromptSetError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}") from None
