"""The `mvpp` command line.

    mvpp demo [--out DIR]     run every available backend of every op on random inputs and check it
                              against the float64 reference; print what is built
    mvpp info                 what is built and which backend `auto` picks
"""
from __future__ import annotations

import argparse
import sys
import time


def _backend_check(args) -> int:
    import torch

    import mvpp_kernels as mk
    from mvpp_kernels.testing import make_selective_scan_inputs, rel_error

    print(mk.format_backend_info())
    print()
    inputs = make_selective_scan_inputs(4, 32, 16, 257, dtype=torch.float32, seed=args.seed)
    ref = mk.selective_scan_ref(**{k: v.double() if v is not None and v.is_floating_point() else v
                                   for k, v in inputs.items() if k != "initial_state"}, delta_softplus=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = 0
    print(f"{'op':<16}{'device':<8}{'backend':<11}{'rel. error vs float64':>22}{'time':>12}")
    for dev in devices:
        for backend in ("reference", "cpu", "triton", "cuda"):
            kw = {k: (v.to(dev) if v is not None else None) for k, v in inputs.items() if k != "initial_state"}
            try:
                t0 = time.perf_counter()
                out = mk.selective_scan(**kw, delta_softplus=True, backend=backend)
                if dev == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            except mk.BackendUnavailableError as e:
                print(f"{'selective_scan':<16}{dev:<8}{backend:<11}{'unavailable':>22}   ({str(e)[:70]})")
                continue
            err = rel_error(out.cpu(), ref)
            ok = err < 1e-4
            failures += not ok
            print(f"{'selective_scan':<16}{dev:<8}{backend:<11}{err:>22.2e}{dt * 1e3:>10.1f}ms{'' if ok else '  FAIL'}")
    return 1 if failures else 0


def cmd_demo(args) -> int:
    return _backend_check(args)


def cmd_info(args) -> int:
    import mvpp_kernels as mk

    print(mk.format_backend_info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mvpp", description="Micro-video popularity prediction on mvpp_kernels.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="run the main job on the embedded synthetic data")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="mvpp-out", help="output folder")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="what is built and which backend auto picks")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
