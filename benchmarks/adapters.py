"""Adapter speed: skillbank beside Hugging Face PEFT on one timm ViT, in one run.

The ViT takes 1x28x28 inputs in 4x4 patches (50 tokens), batch 128, LoRA r=8 on
attn.qkv / attn.proj / mlp.fc1 / mlp.fc2. Contenders run alternately, each
timing is a median, and the table prints ratios beside the goals.

    python benchmarks/adapters.py [--reps 15] [--embed-dim 192] [--depth 12]
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from timing import race

import skillbank as sb

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def build(embed_dim: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=3,
    )


def train_step(model, x, y, opt):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = build(args.embed_dim, args.depth)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))

    ours = copy.deepcopy(base)
    sb.add_adapter(ours, "a", sb.LoRAConfig(rank=8, alpha=16, targets=TARGETS))
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    )
    full = copy.deepcopy(base)
    for m in (ours, peft):
        for p in m.parameters():
            if p.requires_grad:
                # trained-looking B, so nothing is skipped as zero
                torch.nn.init.normal_(p, std=0.02)

    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, m in (("ours", ours), ("peft", peft), ("full", full))
    }
    for m in (ours, peft, full):
        m.train()
    train = race(
        {
            k: (lambda m=m, o=opts[k]: train_step(m, x, y, o))
            for k, m in (("ours", ours), ("peft", peft), ("full", full))
        },
        args.reps,
    )

    def infer(model):
        with torch.inference_mode():
            model(x)

    # unmerged: our layers run the adapter branch in train mode (timm's ViT has no dropout here)
    base.eval(), peft.eval(), ours.train()
    unmerged = race(
        {"base": lambda: infer(base), "ours": lambda: infer(ours), "peft": lambda: infer(peft)},
        args.reps,
    )
    ours.eval()
    merged = race({"base": lambda: infer(base), "ours": lambda: infer(ours)}, args.reps)

    names = [f"s{i}" for i in range(16)]
    for n in names:
        sb.add_adapter(ours, n, sb.LoRAConfig(rank=8, alpha=16, targets=TARGETS), activate=False)
        peft.add_adapter(n, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    for m in (ours, peft):
        for pn, p in m.named_parameters():
            if "lora_B" in pn:
                torch.nn.init.normal_(p, std=0.02)
    rows = [names[i % 16] for i in range(args.batch)]

    def ours_mixed():
        with torch.inference_mode(), sb.mixed_batch(ours, rows):
            ours(x)

    def peft_mixed():
        with torch.inference_mode():
            peft(x, adapter_names=rows)

    mixed = race({"base": lambda: infer(base), "ours": ours_mixed, "peft": peft_mixed}, args.reps)

    table = Table(
        title=f"adapters: ViT d={args.embed_dim} depth={args.depth}, batch {args.batch}, r=8, "
        f"{args.threads} threads, median of {args.reps}"
    )
    for col in ("measure", "ours ms", "peer ms", "ratio", "goal", "met"):
        table.add_column(col, justify="right" if col != "measure" else "left")

    def row(label, a, b, goal=None):
        r = a / b
        table.add_row(
            label,
            f"{a * 1e3:.1f}",
            f"{b * 1e3:.1f}",
            f"{r:.3f}",
            f"<= {goal}" if goal else "-",
            ("yes" if r <= goal else "NO") if goal else "-",
        )

    row("train step / PEFT", train["ours"], train["peft"], 0.9)
    row("train step / full fine-tune", train["ours"], train["full"])
    row("PEFT train step / full fine-tune", train["peft"], train["full"])
    row("unmerged inference / base", unmerged["ours"], unmerged["base"], 1.2)
    row("PEFT unmerged inference / base", unmerged["peft"], unmerged["base"])
    row("eval, one active adapter / base", merged["ours"], merged["base"], 1.03)
    row("mixed batch, 16 adapters / base", mixed["ours"], mixed["base"], 1.15)
    row("PEFT mixed batch / base", mixed["peft"], mixed["base"])
    row("mixed batch / PEFT mixed batch", mixed["ours"], mixed["peft"])
    Console().print(table)


if __name__ == "__main__":
    main()
