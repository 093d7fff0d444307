"""``grace checkpoint patch|verify|unpatch``: serve a trained MoE checkpoint with a GRACE plan."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_CHOICES = ("auto", "megatron-dist", "megatron-torch", "deepspeed")
COMMANDS = {"checkpoint": "patch a Megatron-Core / DeepSpeed MoE checkpoint to a plan's expert layout, verify it, undo it"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``checkpoint`` (with ``patch``, ``verify``, ``unpatch``) to the ``grace`` parser."""
    top = subparsers.add_parser(
        "checkpoint", help=COMMANDS["checkpoint"],
        description="Rewrite the experts of a checkpoint the framework saved (expert e on rank e // (E / ep)) into the slots "
        "a GRACE plan gives every GPU (other experts per rank, unequal counts, replicas), with a manifest of hashes; "
        "check it; write it back in the framework's layout for any EP size.",
    )
    sub = top.add_subparsers(dest="checkpoint_command", metavar="SUBCOMMAND")
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])

    p = sub.add_parser("patch", help="write DST: each GPU's expert slots as PLAN places them, the rest of SRC, a manifest",
                       description="Read SRC (a checkpoint written by Megatron-Core dist_checkpointing torch_dist, Megatron "
                       "legacy per-rank torch, or DeepSpeed engine.save_checkpoint; torch files with weights_only=True only) "
                       "and write DST: experts/rank_NNNNN.safetensors (each GPU's slots, replicas included), "
                       "dense.safetensors (every other tensor), plan.json and grace-checkpoint.json (sizes, sha256 digests, "
                       "per-slot expert, layer, dtype, shape). Streams one expert at a time; DST appears only when complete "
                       "and verified. Optimizer and RNG states are not carried over.")
    p.add_argument("src", type=Path, metavar="SRC", help="checkpoint directory (the root or the iteration/tag directory)")
    p.add_argument("dst", type=Path, metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--plan", type=Path, required=True, help="placement plan JSON (grace-plan/1, from `grace plan`)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto", help="source format (default: detected)")
    p.add_argument("--hidden-size", type=int, default=None, help="expected hidden size h (checked against the experts)")
    p.add_argument("--ffn-size", type=int, default=None, help="expected expert FFN width f (checked)")
    p.add_argument("--dtype", default=None, help="expected expert dtype, e.g. bfloat16 (checked)")
    p.add_argument("--hash-source", action="store_true", help="also record each source file's sha256 (one more read of SRC)")
    p.add_argument("--file-sha256", action="store_true",
                   help="also record the plain sha256 of every output file (default: a tree digest of its header and "
                   "per-tensor sha256, which covers every byte without hashing each replica again)")
    p.add_argument("--no-kernel-copy", dest="kernel_copy", action="store_false",
                   help="write every block from the read buffer instead of copying it in the kernel (os.copy_file_range; "
                   "used by default where the file system supports it)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run_patch)

    p = sub.add_parser("verify", help="recompute every hash of DST; check it against its plan (and SRC)",
                       description="Exit 0 only if every file's size and digest (tree_sha256, and sha256 where recorded), "
                       "every slot tensor's bytes, the manifest and plan.json agree; with --against, also every slot "
                       "against the source expert, bit for bit.")
    p.add_argument("dst", type=Path, metavar="DST", help="patched checkpoint directory")
    p.add_argument("--against", type=Path, default=None, metavar="SRC", help="the source checkpoint to compare with")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("unpatch", help="write the framework's standard layout again (any EP size)",
                       description="Write OUT in the source's format with each expert on rank e // (E / ep); every weight "
                       "equals the source bit for bit (checked by reading OUT back).")
    p.add_argument("dst", type=Path, metavar="DST", help="patched checkpoint directory")
    p.add_argument("out", type=Path, metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--ep-size", type=int, default=None, help="expert-parallel size of OUT (default: the source's; "
                   "torch_dist and DeepSpeed files do not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_unpatch)


def run_patch(args: argparse.Namespace) -> int:
    from megatron_grace._files import format_bytes
    from megatron_grace.checkpoint import patch_checkpoint

    s = patch_checkpoint(args.src, args.dst, args.plan, fmt=args.format, overwrite=args.overwrite, hidden_size=args.hidden_size,
                         ffn_size=args.ffn_size, dtype=args.dtype, hash_source=args.hash_source,
                         file_sha256=args.file_sha256, kernel_copy=args.kernel_copy)
    print(f"patched {s.format} checkpoint {args.src} -> {args.dst}: {s.slots} slots, {s.files} files, "
          f"{format_bytes(s.source_bytes)} read, {format_bytes(s.written_bytes)} written in {s.seconds:.1f} s "
          f"({format_bytes(s.source_bytes / max(s.seconds, 1e-9))}/s of source)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from megatron_grace._files import format_bytes
    from megatron_grace.checkpoint import verify_checkpoint

    r = verify_checkpoint(args.dst, against=args.against)
    r.raise_if_failed()
    extra = f", {r.experts_against_source} experts equal to {args.against}" if args.against is not None else ""
    print(f"ok: {r.files} files ({format_bytes(r.bytes)}) and the manifest, {r.slots} slots agree with the manifest and plan{extra}")
    return 0


def run_unpatch(args: argparse.Namespace) -> int:
    from megatron_grace._files import format_bytes
    from megatron_grace.checkpoint import unpatch_checkpoint

    s = unpatch_checkpoint(args.dst, args.out, args.ep_size, overwrite=args.overwrite)
    print(f"wrote {s.format} checkpoint {args.out} for EP {s.ep_size}: {s.files} files, {format_bytes(s.bytes)}; every weight reads back bit-exactly")
    return 0
