"""Write notebooks/demo/: the model of the default `python train.py` run, so that the notebooks can show a
dictionary and an ITM head that have learned something without 7 minutes of training first.

    python train.py && python notebooks/make_demo.py [runs/pretrain/ckpt.pt]

demo/tiny-pretrained.pt holds the weights in fp16 (2.8 MB; the notebooks load them back into fp32), the
SOHOConfig, the run's held-out ITM numbers and where it came from; demo/vocab.txt is its vocabulary (the 2,000-image
synthetic world's: a world of another size trains another WordPiece vocabulary).
"""

import os
import shutil
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import train  # noqa: E402


def main(path="runs/pretrain/ckpt.pt"):
    ckpt = train.load_checkpoint(path)
    if ckpt["task"] != "pretrain" or ckpt["train_config"]["preset"] != "tiny":
        raise SystemExit(f"{path}: expected a tiny pre-training checkpoint, found {ckpt['task']} at preset "
                         f"{ckpt['train_config']['preset']}")
    out = os.path.join(HERE, "demo")
    os.makedirs(out, exist_ok=True)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    metrics = {k: v for k, v in ckpt["metrics"].items() if k.startswith("heldout") or k in ("step", "vd_used")}
    train.save_checkpoint(os.path.join(out, "tiny-pretrained.pt"), {
        "model": weights, "model_config": ckpt["model_config"], "metrics": metrics,
        "made_by": f"python train.py (seed {ckpt['train_config']['seed']}, {ckpt['step']} steps), "
                   "then python notebooks/make_demo.py"})
    shutil.copyfile(ckpt["vocab_path"], os.path.join(out, "vocab.txt"))
    print(f"wrote {out}: {metrics}")


if __name__ == "__main__":
    main(*sys.argv[1:])
