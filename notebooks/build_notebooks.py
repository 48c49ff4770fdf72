"""Build the read-along notebooks (notebooks/NN_*.ipynb) from their scripts (notebooks/NN_*.py) and execute them,
keeping their outputs.

    python notebooks/build_notebooks.py                  # build every notebook from its script and execute it
    python notebooks/build_notebooks.py 04 09            # only the notebooks whose names start with 04 or 09
    python notebooks/build_notebooks.py --write-only     # write the .ipynb files without executing them
    python notebooks/build_notebooks.py --execute-only   # re-execute the committed .ipynb files as they are

The scripts are the source: jupytext percent format (`# %% [markdown]` cells with `# `-prefixed lines, `# %%` code
cells), each runnable as it is with `python notebooks/NN_*.py`. Edit them, not the .ipynb files
(tests/test_notebooks.py checks that the two agree). Each notebook runs in a fresh kernel with notebooks/ as its
working directory. All of them share one cache folder ($SOHO_NB_CACHE; a fresh temporary one per invocation unless
it is set), so the synthetic world is written and the tiny model pre-trained once per build; a notebook run alone
makes them itself.
"""

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import time

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
KERNEL = "python3"
CELL_TIMEOUT = 300  # seconds
MAX_BYTES = 1_500_000

# name -> script, e.g. "04_eq4_ema_update" -> notebooks/04_eq4_ema_update.py
NOTEBOOKS = {os.path.basename(p)[:-len(".py")]: p
             for p in sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.py")))
             if re.match(r"\d\d_", os.path.basename(p))}


def make_notebook(name):
    """The notebook of a script (a name in NOTEBOOKS or a path), without outputs."""
    nb = jupytext.read(NOTEBOOKS.get(name, name), fmt="py:percent")
    nb.metadata = {"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for k, cell in enumerate(nb.cells):
        cell.id = f"cell-{k:02d}"  # stable ids: rebuilding changes only what changed
        cell.metadata = {}
    return nb


def execute(nb, timeout=CELL_TIMEOUT):
    """Run a notebook (a NotebookNode, executed in place, or the path of an .ipynb file) in a fresh kernel with
    notebooks/ as working directory; returns the executed notebook. Raises
    nbclient.exceptions.CellExecutionError (with the cell and traceback) when a cell fails."""
    if isinstance(nb, str):
        nb = nbformat.read(nb, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="*", help="name prefixes, e.g. 04 09 (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write-only", action="store_true", help="write the .ipynb files without executing them")
    mode.add_argument("--execute-only", action="store_true", help="re-execute the .ipynb files as they are")
    args = p.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only)]
    if not names:
        raise SystemExit(f"no notebook starts with {' or '.join(args.only)}")
    own_cache = "SOHO_NB_CACHE" not in os.environ
    if own_cache:
        os.environ["SOHO_NB_CACHE"] = tempfile.mkdtemp(prefix="soho-notebooks-")
    started, failed = time.time(), []
    try:
        for name in names:
            path = os.path.join(NOTEBOOK_DIR, name + ".ipynb")
            nb = nbformat.read(path, as_version=4) if args.execute_only else make_notebook(name)
            if args.write_only:
                nbformat.write(nb, path)
                print(f"wrote {os.path.relpath(path)}")
                continue
            t0 = time.time()
            try:
                execute(nb)
            except CellExecutionError as e:  # keep going: report every notebook that fails
                print(f"FAILED {name}: {e}", file=sys.stderr, flush=True)
                failed.append(name)
            nbformat.write(nb, path)  # a failed one with its outputs up to the error, which the tests reject
            size = os.path.getsize(path)
            print(f"{name:34s} {time.time() - t0:6.1f} s  {size / 1e3:7.1f} kB"
                  + ("  TOO LARGE" if size > MAX_BYTES else ""), flush=True)
            if size > MAX_BYTES:
                failed.append(name)
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("SOHO_NB_CACHE"), ignore_errors=True)
    print(f"total {time.time() - started:.1f} s")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
