"""The medclip demo page. Start it with `medclip app [--model M --index I]`, or
`streamlit run medclip/app/streamlit_app.py -- --model M --index I`. Layout only: the work is in `handlers`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

from medclip.app import handlers
from medclip.app.handlers import InputError
from medclip.app.launch import DEFAULT_INDEX, DEFAULT_MODEL

COLUMNS = 5  # images per row
MAX_K = 50


def page_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="streamlit_app.py")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--index", default=DEFAULT_INDEX)
    return parser.parse_args(argv)


@st.cache_resource(show_spinner="Loading the model (once)...")
def get_embedder(model_dir: str):
    return handlers.load_embedder(model_dir)


@st.cache_resource(show_spinner="Loading the embedding index (once)...")
def get_index(index_path: str, modified: float | None, model_dir: str):
    return handlers.load_index(index_path, get_embedder(model_dir))


def shown_path(path: str) -> str:
    """Relative to the working folder when inside it: shorter, and what the user typed."""
    return str(Path(path).relative_to(Path.cwd())) if Path(path).is_relative_to(Path.cwd()) else path


def sidebar(model_dir: str, index_path: str, index) -> int:
    st.sidebar.markdown(f"**Model** `{shown_path(model_dir)}`")
    size = f" ({len(index):,} images)" if index is not None else ""
    st.sidebar.markdown(f"**Index** `{shown_path(index_path)}`{size}")
    max_k = min(MAX_K, len(index)) if index is not None else MAX_K
    if max_k == 1:
        return 1
    return st.sidebar.slider("Images to show (k)", 1, max_k, min(10, max_k), key="k")


def use_example() -> None:
    if st.session_state.example:
        st.session_state.query = st.session_state.example


def search_tab(embedder, index, index_error: str | None, k: int) -> None:
    st.selectbox("Example queries", handlers.EXAMPLE_QUERIES, index=None, key="example",
                 placeholder="Pick an example query...", on_change=use_example)
    st.session_state.setdefault("query", handlers.EXAMPLE_QUERIES[0])
    query = st.text_input("Search query", key="query", placeholder="e.g. chest x-ray with pleural effusion")
    if index_error:
        st.error(index_error)
        return
    try:
        hits = handlers.search_images(embedder, index, query, k)
    except InputError as error:
        st.warning(str(error))
        return
    st.caption(f'Top {len(hits)} of {len(index):,} images for "{query.strip()}" (cosine similarity)')
    show_hits(hits)


def show_hits(hits) -> None:
    for start in range(0, len(hits), COLUMNS):
        for column, hit in zip(st.columns(COLUMNS), hits[start:start + COLUMNS], strict=False):
            label = f"#{hit.rank} · {hit.score:.3f}" + (f" · {hit.caption}" if hit.caption else "")
            if Path(hit.path).is_file():
                column.image(hit.path, caption=label, width="stretch")
            else:  # moved since the index was built, or a relative path from another working folder
                column.warning(f"{label}\n\nImage file not found: `{hit.path}`")


def upload_tab(embedder, index=None, k: int = 10) -> None:
    uploaded = st.file_uploader("Upload a radiology image (PNG, JPEG, GIF or BMP)", key="upload")
    left, right = st.columns(2)
    captions = left.text_area("Candidate captions, one a line", "\n".join(handlers.EXAMPLE_QUERIES),
                              key="captions", height=160)
    labels = right.text_area("Zero-shot labels, one a line", "\n".join(handlers.DEFAULT_LABELS),
                             key="labels", height=160)
    if uploaded is None:
        st.info("Upload an image to rank the captions and the labels for it.")
        return
    try:
        result = handlers.describe_upload(embedder, uploaded.name, uploaded.getvalue(),
                                          handlers.lines(captions), handlers.lines(labels))
    except InputError as error:
        st.error(str(error))
        return
    image_column, tables_column = st.columns([1, 3])
    image_column.image(uploaded.getvalue(), caption=uploaded.name, width="stretch")
    formats = {"probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.3f"),
               "cosine": st.column_config.NumberColumn(format="%.3f")}
    for title, scored, name in (("Ranked captions", result.captions, "caption"),
                                ("Zero-shot labels", result.labels, "label")):
        tables_column.subheader(title)
        table = pd.DataFrame([{name: s.text, "probability": s.probability, "cosine": s.cosine} for s in scored])
        tables_column.dataframe(table, hide_index=True, column_config=formats)
    if index is not None:  # image -> image: the indexed images closest to the upload
        st.subheader("Similar images")
        hits = handlers.similar_images(index, result.embedding, k)
        st.caption(f"Top {len(hits)} of {len(index):,} indexed images closest to {uploaded.name} (cosine similarity)")
        show_hits(hits)


def main() -> None:
    args = page_args(sys.argv[1:])
    st.set_page_config(page_title="medclip search", page_icon="🩻", layout="wide")
    st.title("medclip: radiology image search")
    try:
        embedder = get_embedder(args.model)
    except InputError as error:
        st.error(str(error))
        st.stop()
    index, index_error = None, None
    try:
        index = get_index(args.index, handlers.index_mtime(args.index), args.model)
    except InputError as error:
        index_error = str(error)
    k = sidebar(args.model, args.index, index)
    search, upload = st.tabs(["Search images by text", "Rank captions and find similar images for an image"])
    with search:
        search_tab(embedder, index, index_error, k)
    with upload:
        upload_tab(embedder, index, k)


main()
