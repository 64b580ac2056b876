"""pnode-inspect FILE...: list what pnode_dist HDF5 files hold (checkpoints: steps, times,
shapes, ranks, norms, sizes; other pnode_dist files: their datasets and attributes).

    pnode-inspect runs/ckpt/*.h5            # a table per file
    python -m pnode_dist.inspect --json F   # the same as JSON, for scripts
Exit status 0 when every file was read, 1 otherwise (each failure says why on stderr).
Only regular files are opened; datasets declared larger than the file (or 1 GiB) are listed
without their norms; text from a file is printed with control characters escaped.
"""
import argparse
import json
import sys

from .h5format import CHECKPOINT_FORMAT, FileFormatError, describe


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def safe(value):
    """str(value) with every non-printable character escaped as in a Python literal (\\n,
    \\r, \\x1b, \\u202e, ...): text from a file can neither break lines nor send terminal
    escape sequences, so it cannot fake output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def format_text(info):
    """A file's description as readable lines (everything taken from the file escaped)."""
    a = {safe(k): safe(v) for k, v in info["attributes"].items()}
    lines = [f"{safe(info['file'])}  ({safe(info['format'])}, {_human_bytes(info['bytes'])})"]
    if info["format"] == CHECKPOINT_FORMAT:
        lines.append(f"  rank {a.get('rank')} of {a.get('nranks')}, method {a.get('method')}, "
                     f"model dtype {a.get('dtype')}, shard {a.get('local_shape')} of global "
                     f"{a.get('global_shape')}, created {a.get('created')}")
        if "steps" in info:
            lines.append(f"  forward solve: {info['steps']} steps from t={info['t_start']:g} "
                         f"to t={info['t_end']:g}")
        rows = info["checkpoints"]
        lines.append(f"  {len(rows)} checkpoint(s) in the file")
        if rows:
            lines.append(f"  {'step':>8} {'time':>14} {'step size':>12} {'shape':>14} "
                         f"{'norm':>14} {'size':>10}")
            for r in rows:
                norm = "not read" if r["norm"] is None else f"{r['norm']:.8g}"
                lines.append(f"  {r['step']:>8} {r['time']:>14.8g} {r['step_size']:>12.5g} "
                             f"{str(r['shape']):>14} {norm:>14} "
                             f"{_human_bytes(r['bytes']):>10}")
                if "skipped" in r:
                    lines.append(f"  {'':>8} (data not read: {safe(r['skipped'])})")
    else:
        if "checksum_status" in info:
            lines.append(f"  checksum status: {safe(info['checksum_status'])}")
        for k, v in a.items():
            if k != "format":
                lines.append(f"  {k}: {v}")
        for d in info["datasets"]:
            norm = f"  norm {d['norm']:.8g}" if "norm" in d else ""
            if "skipped" in d:
                norm = f"  (data not read: {safe(d['skipped'])})"
            lines.append(f"  /{safe(d['name'])}  {safe(d['dtype'])} {d['shape']}{norm}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="pnode-inspect",
        description="List what pnode_dist HDF5 files (checkpoints, training states) hold.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="HDF5 files written by pnode_dist")
    parser.add_argument("--json", action="store_true", help="print one JSON document (a list "
                        "with one object per file that could be read)")
    args = parser.parse_args(argv)
    infos, failed = [], 0
    for path in args.files:
        try:
            infos.append(describe(path))
        except FileFormatError as exc:
            print(f"pnode-inspect: {safe(exc)}", file=sys.stderr)
            failed += 1
        except Exception as exc:        # describe turns a file's problems into the above
            print(f"pnode-inspect: {safe(path)}: unexpected {type(exc).__name__}: {safe(exc)}",
                  file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n\n".join(format_text(i) for i in infos))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
