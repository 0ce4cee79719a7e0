"""Kill saves with SIGKILL at random moments and check that the file under the real name is always the
old or the new one, loadable, and that nothing but our own temporaries is ever left behind.

    python scripts/kill_loop.py --kills 50                    # 50 kills of bank saves + 50 of checkpoint saves
    python scripts/kill_loop.py --kills 200 --kinds bank --json out.json

How: this process builds a memory bank (HierarchicalIndex) and a small model with an optimizer once, saves
generation 0, then for each kill forks a writer that saves generation g, g+1, ... in a loop (a bank
generation is one `update` of a few items, a checkpoint generation one optimizer step; each finished save
is reported through a pipe), sleeps a random delay drawn from a seeded `random.Random` over ~1.5 save
cycles, SIGKILLs the writer and reaps it. Then, at every kill, it asserts the invariant:

  * the target exists and loads through the verifying loader (checksum, format, version);
  * its generation is the last one the writer reported finished (the kill came before the next
    os.replace: "old") or the one after it (after os.replace, before the report: "new");
  * every other file in the folder is a temporary of our exact pattern written by a killed writer, and
    once a writer has finished a save no temporary of an earlier (dead) writer is left (each save cleans
    them first);

and after the loop one more save must leave no temporary at all. Pass/fail depends only on these
invariants, never on timing: the delays only spread the kills over the save cycle (the counts of
"old"/"new" and "temporary left" in the report show where they landed). Exit status 0 = all held.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the writers are fork()ed: keep the parent single-threaded

import torch  # noqa: E402

torch.set_num_threads(1)

from mvpp_kernels import HierarchicalIndex, _io  # noqa: E402
from mvpp.train import load_checkpoint, save_checkpoint  # noqa: E402


class Invariant(AssertionError):
    pass


# ------------------------------------------------------------------------------------- workloads
class BankWork:
    """A bank whose generation g has base + g * step items (one update per generation)."""
    name = "bank"

    def __init__(self, n: int, d: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        self.index = HierarchicalIndex.build(keys, branching=(4, 4), seed=seed)
        self.base, self.step, self.d, self.gen_ = int(self.index.n_items), 3, d, torch.Generator().manual_seed(seed + 1)

    def advance(self) -> None:
        self.index.update(torch.nn.functional.normalize(torch.randn(self.step, self.d, generator=self.gen_), dim=1))

    def save(self, path: str, g: int) -> None:
        self.index.save(path)

    def reload(self, path: str) -> None:  # continue from what is on disk, as a restarted service would
        self.index = HierarchicalIndex.load(path)

    def generation(self, path: str) -> int:
        n = int(HierarchicalIndex.load(path).n_items)
        if (n - self.base) % self.step:
            raise Invariant(f"{path}: {n} items is no generation of this loop (base {self.base}, step {self.step})")
        return (n - self.base) // self.step


class CheckpointWork:
    """A model + AdamW whose generation g is stored in the checkpoint's extra and follows g optimizer steps."""
    name = "checkpoint"

    def __init__(self, width: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(16, width, generator=g)

    def advance(self) -> None:
        self.opt.zero_grad()
        self.model(self.x).square().mean().backward()
        self.opt.step()

    def save(self, path: str, g: int) -> None:
        save_checkpoint(path, self.model, self.opt, {"generation": g},
                        best_state={k: v.clone() for k, v in self.model.state_dict().items()})

    def reload(self, path: str) -> None:  # continue from what is on disk, as a resumed run would
        load_checkpoint(path, self.model, self.opt)

    def generation(self, path: str) -> int:
        m = torch.nn.Sequential(torch.nn.Linear(self.x.shape[1], self.x.shape[1]), torch.nn.Tanh(),
                                torch.nn.Linear(self.x.shape[1], 1))
        return int(load_checkpoint(path, m, torch.optim.AdamW(m.parameters(), lr=1e-3))["generation"])


# ------------------------------------------------------------------------------------- the loop
def _writer(work, path: str, first_gen: int, w: int) -> None:
    """Child: save generations first_gen, first_gen+1, ... forever, reporting each finished one."""
    try:
        g = first_gen
        while True:
            work.advance()
            work.save(path, g)
            os.write(w, g.to_bytes(8, "little") + time.monotonic_ns().to_bytes(8, "little"))
            g += 1
    except BaseException:  # noqa: BLE001 - a failing writer must not look like a clean kill
        os._exit(3)


class _Reports:
    """The writer's (generation, time) reports, read from its pipe without ever blocking past a deadline."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.items = fd, b"", []

    def _take(self, chunk: bytes) -> None:
        self.buf += chunk
        while len(self.buf) >= 16:
            self.items.append((int.from_bytes(self.buf[:8], "little"), int.from_bytes(self.buf[8:16], "little") / 1e9))
            self.buf = self.buf[16:]

    def wait_for(self, n: int, deadline: float) -> bool:
        while len(self.items) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return False
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return False
            self._take(chunk)
        return True

    def drain(self) -> list:
        while True:  # the writer is dead: read to EOF
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return self.items
            self._take(chunk)


def _strays(folder: str, target: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != os.path.basename(target))


def _tmp_pid(name: str) -> int | None:
    m = _io._TMP_RE.match(name)
    return int(m.group("pid")) if m else None


def kill_loop(work, folder: str, kills: int, seed: int, deadline: float) -> dict:
    path = os.path.join(folder, f"{work.name}.safetensors")
    rng = random.Random(seed)
    work.save(path, 0)
    committed = work.generation(path)
    if committed != 0:
        raise Invariant(f"generation 0 read back as {committed}")
    # one save cycle (advance + save), to spread the kills over it; timing never decides pass/fail
    t0 = time.perf_counter()
    for _ in range(3):
        work.advance()
        work.save(path, committed + 1)
        committed += 1
    cycle = (time.perf_counter() - t0) / 3
    if work.generation(path) != committed:
        raise Invariant("in-process saves did not read back")
    killed: list[int] = []
    counts = {"kills": 0, "old": 0, "new": 0, "temporary_left": 0, "saves_finished_by_writers": 0,
              "temporaries_cleaned_by_next_save": 0}
    for i in range(kills):
        if time.monotonic() > deadline:
            raise Invariant(f"time budget spent after {i} of {kills} kills (raise --budget-s)")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(r)
            _writer(work, path, committed + 1, w)
        os.close(w)
        # let the writer finish 0, 1 or 2 saves, then kill it at a random point of its next save cycle
        # (estimated from its own reports): kills land before, during and after os.replace
        rep = _Reports(r)
        wait = rng.choice([0, 1, 2])
        delay = rng.uniform(0.0, 1.25 * cycle)
        if not rep.wait_for(wait, deadline):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise Invariant(f"kill {i}: the writer reported no save before the time budget ran out")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        reports = rep.drain()
        os.close(r)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            raise Invariant(f"kill {i}: the writer ended by itself (status {status}): a save raised")
        killed.append(pid)
        if len(reports) >= 2:  # the writer's own cycle (fork()ed writers are slower than this process)
            cycle = 0.5 * cycle + 0.5 * (reports[-1][1] - reports[0][1]) / (len(reports) - 1)
        reports = [g for g, _ in reports]
        last_done = reports[-1] if reports else committed
        counts["saves_finished_by_writers"] += len(reports)
        counts[f"killed_after_{min(len(reports), 3)}{'+' if len(reports) >= 3 else ''}_saves"] = \
            counts.get(f"killed_after_{min(len(reports), 3)}{'+' if len(reports) >= 3 else ''}_saves", 0) + 1
        if os.environ.get("KILL_LOOP_DEBUG"):
            print(f"kill {i}: waited for {wait}, delay {delay * 1e3:.1f} ms, {len(reports)} saves", flush=True)
        # 1. the real name holds a whole file of the old or the new generation
        if not os.path.exists(path):
            raise Invariant(f"kill {i}: {path} is missing")
        try:
            got = work.generation(path)
        except (ValueError, OSError) as e:
            raise Invariant(f"kill {i}: {path} does not load: {e}") from e
        if got == last_done:
            counts["old"] += 1
        elif got == last_done + 1:
            counts["new"] += 1
        else:
            raise Invariant(f"kill {i}: {path} holds generation {got}; expected {last_done} or {last_done + 1}")
        # 2. nothing else but temporaries of killed writers; finished saves cleaned the older ones
        strays = _strays(folder, path)
        for n in strays:
            p = _tmp_pid(n)
            if p is None or p not in killed:
                raise Invariant(f"kill {i}: unexpected file {n!r} next to {path}")
            if reports and p != pid:
                raise Invariant(f"kill {i}: {n!r} of an earlier killed writer survived a finished save")
        counts["temporary_left"] += bool(strays)
        if len(strays) > 1 and reports:
            raise Invariant(f"kill {i}: {len(strays)} temporaries left: {strays}")
        counts["kills"] += 1
        committed = got
        work.reload(path)
    before = len(_strays(folder, path))
    work.advance()
    work.save(path, committed + 1)
    if _strays(folder, path):
        raise Invariant(f"a save after the loop left {_strays(folder, path)}")
    counts["temporaries_cleaned_by_next_save"] = before
    if work.generation(path) != committed + 1:
        raise Invariant("the final save did not read back")
    counts["save_cycle_ms"] = round(cycle * 1e3, 2)
    counts["file_bytes"] = os.path.getsize(path)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="SIGKILLs per kind (default 50)")
    ap.add_argument("--kinds", default="bank,checkpoint", help="comma-separated: bank, checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays and of the data")
    ap.add_argument("--bank-items", type=int, default=20000)
    ap.add_argument("--bank-dim", type=int, default=64)
    ap.add_argument("--model-width", type=int, default=256)
    ap.add_argument("--dir", help="folder for the files (default: a fresh temporary folder)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="fail (never hang) past this many seconds")
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args(argv)
    if args.kills < 1:
        ap.error("--kills must be >= 1")
    deadline = time.monotonic() + args.budget_s
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - {"bank", "checkpoint"}
    if unknown:
        ap.error(f"--kinds: unknown {sorted(unknown)}; choose from bank, checkpoint")
    report = {"kills_per_kind": args.kills, "seed": args.seed, "results": {}}
    ok = True
    for kind in kinds:
        work = (BankWork(args.bank_items, args.bank_dim, args.seed) if kind == "bank"
                else CheckpointWork(args.model_width, args.seed))
        folder = args.dir and os.path.join(args.dir, kind)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"kill-loop-{kind}-") as tmp:
            try:
                counts = kill_loop(work, folder or tmp, args.kills, args.seed, deadline)
                report["results"][kind] = {"ok": True, **counts}
            except Invariant as e:
                ok = False
                report["results"][kind] = {"ok": False, "error": str(e)}
        print(f"{kind}: {json.dumps(report['results'][kind])}", flush=True)
    report["ok"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
