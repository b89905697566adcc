"""Seconds per bare stage-A training step of the network (forward, backward, AdamW) on a
random channels-last window, without data, losses or EMA: how the step cost scales with
width and in-plane size (MODEL_CARD.md, "Coarser windows first").

  python3 step_time.py --size 128      # the recipe's window: 40 slices, half widths
  python3 step_time.py --size 96
"""

import argparse
import time

import torch

from model import DEFAULT_WIDTHS, TriageNet


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="in-plane size of the window")
    ap.add_argument("--window", type=int, default=40, help="model slices in the window")
    ap.add_argument("--width-div", type=int, default=2, help="DEFAULT_WIDTHS divided by this (2: the shipped widths)")
    ap.add_argument("--frac-hires", type=int, default=16)
    ap.add_argument("--steps", type=int, default=15, help="timed steps, after 3 warm-up ones")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = {k: max(4, v // args.width_div) for k, v in DEFAULT_WIDTHS.items()}
    model = TriageNet(widths=widths, frac_hires=args.frac_hires).train().to(memory_format=torch.channels_last)
    x = torch.rand(args.window, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        seg, frac, _, seq = model.features(x)
        vertebra_logits, patient_logit, _ = model.head(seq)
        loss = seg.mean() + frac.mean() + vertebra_logits.sum() + patient_logit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.time()
    for _ in range(args.steps):
        step()
    print(f"size {args.size} window {args.window} widths {widths} frac_hires {args.frac_hires}: "
          f"{sum(p.numel() for p in model.parameters())} parameters, {(time.time() - t) / args.steps:.4f} s a step")


if __name__ == "__main__":
    main()
