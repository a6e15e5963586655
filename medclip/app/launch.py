"""`medclip app`: starts the Streamlit demo page over a model folder and an embedding index.

Without arguments it serves the embedded demo's outputs (`make demo` trains the model into `outputs/demo` and
builds `outputs/demo/index.npz`). Runs `streamlit run streamlit_app.py -- --model M --index I` in a child
process and returns its exit status.

Streamlit always runs headless: otherwise, on its first run on a machine, it stops at an "Email:" prompt (in a
terminal it waits; under `make app` in the background it exits 255). The server's address is printed instead of
a browser tab being opened. The child ends with its parent: SIGTERM, SIGINT and SIGHUP are forwarded and the
child reaped, and on Linux the kernel sends it SIGTERM if the parent dies without a chance to forward (SIGKILL).
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from medclip.flag_parsing import ArgumentParser, number_in_range

DEFAULT_MODEL = "outputs/demo"
DEFAULT_INDEX = "outputs/demo/index.npz"
APP_FILE = Path(__file__).with_name("streamlit_app.py")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="medclip app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (default: %(default)s)")
    parser.add_argument("--index", default=DEFAULT_INDEX,
                        help="embedding index from `medclip embed` (default: %(default)s)")
    parser.add_argument("--port", type=number_in_range(int, 1, 65535), default=8501)
    parser.add_argument("--address", default="localhost",
                        help="interface to serve on; 0.0.0.0 to reach the app from other machines")
    parser.add_argument("--headless", action="store_true",
                        help="accepted for older command lines: the app always runs headless (no browser tab, no "
                             "prompt); open the address it prints")
    return parser


def _absolute(path: str) -> str:
    """Local paths made absolute (the page must not depend on the server's working folder); Hub ids kept."""
    return str(Path(path).absolute()) if Path(path).exists() else path


def streamlit_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_FILE),
        "--server.port", str(args.port),
        "--server.address", args.address,
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--", "--model", _absolute(args.model), "--index", _absolute(args.index),
    ]


def missing_demo_outputs(args: argparse.Namespace) -> list[str]:
    """The default demo outputs that are asked for but not there yet."""
    missing = []
    if args.model == DEFAULT_MODEL and not (Path(DEFAULT_MODEL) / "config.json").is_file():
        missing.append(f"{DEFAULT_MODEL}/config.json")
    if args.index == DEFAULT_INDEX and not Path(DEFAULT_INDEX).is_file():
        missing.append(DEFAULT_INDEX)
    return missing


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_demo_outputs(args)
    if missing:
        print(f"medclip app: the demo's outputs are not there yet ({', '.join(missing)} under {Path.cwd()}): "
              "run `make demo` first or pass --model/--index", file=sys.stderr)
        return 2
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("medclip app: streamlit is not installed: pip install -e '.[app]'", file=sys.stderr)
        return 2
    print(f"medclip app: serving {args.model} with {args.index}; open http://{args.address}:{args.port} "
          "(Ctrl-C stops it)", flush=True)
    return run_child(streamlit_command(args))


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when the parent process dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_child(command: list[str]) -> int:
    """Runs `command` as a child that ends with this process: signals forwarded, the child always reaped."""
    child = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # SIGINT arrives here when handlers are replaced; forwarded above
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 128 - code if code < 0 else code
