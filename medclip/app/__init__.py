"""The Streamlit demo app (`medclip app`): text-to-image search over an embedding index, and caption ranking
with zero-shot labels for an uploaded image.

- ``handlers``: what the page does, as plain functions (tested without Streamlit or a browser).
- ``streamlit_app``: the page itself, a thin layout over ``handlers``.
- ``launch``: the `medclip app` command, which runs ``streamlit run`` on the page.
"""
