"""The report of ``ciae-bench``: ratios between the contenders and the markdown tables.

Per (backbone, size), from the medians: ours / FCOS, the fusion share of ours' total (the
``fusion`` stage over the end-to-end median), onnxruntime / torch and ours / Mask R-CNN
(:func:`ratios`); a latency table with those ratios, the stage table of ours and the memory
table, labelled by what was measured (:func:`markdown_tables`, :mod:`ciae_core.bench`).
"""

from __future__ import annotations

from typing import Any

from ciae_core.bench import EAGER_MEMORY_NOTE


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, size): ours/FCOS, fusion share, onnxruntime/torch, ours/Mask R-CNN (medians)."""
    out = []
    results = [r for r in results if "error" not in r]
    keys = sorted({(r["backbone"], r["size"]) for r in results}, key=lambda k: (k[0], k[1]))
    for bb, size in keys:
        rows = {(r["model"], r["engine"]): r for r in results if r["backbone"] == bb and r["size"] == size}
        ours = rows.get(("ours", "torch"))
        ort = rows.get(("ours", "onnxruntime"))
        fcos = rows.get(("fcos", "torch"))
        mrcnn = rows.get(("maskrcnn", "torch"))

        def ratio(a, b):
            return a["median_ms"] / b["median_ms"] if a and b else None

        fusion_share = None
        if ours and "stages_ms" in ours and ours["median_ms"] > 0:
            fusion_share = ours["stages_ms"]["fusion"] / ours["median_ms"]
        out.append({"backbone": bb, "size": size, "ours_over_fcos": ratio(ours, fcos),
                    "fusion_share": fusion_share, "ort_over_torch": ratio(ort, ours),
                    "ours_over_maskrcnn": ratio(ours, mrcnn)})
    return out


def _fmt(v, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def markdown_tables(results: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> str:
    """Latency and ratio table, stage table, memory table and the failed rows, as markdown."""
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    lines = ["| backbone | size | ours torch ms (p90) | ours ORT ms (p90) | FCOS ms (p90) | Mask R-CNN ms (p90) | "
             "ours/FCOS | fusion share | ORT/torch | ours/Mask R-CNN |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rr in ratio_rows:
        rows = {(r["model"], r["engine"]): r for r in results
                if r["backbone"] == rr["backbone"] and r["size"] == rr["size"]}

        def cell(key):
            r = rows.get(key)
            return "–" if r is None else f"{r['median_ms']:.1f} ({r['p90_ms']:.1f})"

        lines.append(f"| {rr['backbone']} | {rr['size']} | {cell(('ours', 'torch'))} | {cell(('ours', 'onnxruntime'))} | "
                     f"{cell(('fcos', 'torch'))} | {cell(('maskrcnn', 'torch'))} | {_fmt(rr['ours_over_fcos'], '.2f')} | "
                     f"{_fmt(rr['fusion_share'], '.1%')} | {_fmt(rr['ort_over_torch'], '.2f')} | "
                     f"{_fmt(rr['ours_over_maskrcnn'], '.2f')} |")
    stage_rows = [r for r in results if "stages_ms" in r]
    if stage_rows:
        names = list(stage_rows[0]["stages_ms"])
        lines += ["", "| backbone | size | " + " | ".join(names) + " | (ms, median) |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for r in stage_rows:
            lines.append(f"| {r['backbone']} | {r['size']} | " + " | ".join(f"{r['stages_ms'][n]:.1f}" for n in names)
                         + " | |")
    mem_rows = [r for r in results if "mem_kind" in r]
    if mem_rows:
        device_level = any(r.get("device_used_delta_mb") is not None for r in mem_rows)
        extra = " device used increase MB |" if device_level else ""
        lines += ["", f"| backbone | size | model | engine | peak memory MB | increase MB | measured as |{extra}",
                  "|---|---|---|---|---|---|---|" + ("---|" if device_level else "")]
        for r in mem_rows:
            kind = r["mem_kind"].replace("_", " ") + (" (eager forward)" if r.get("mem_note") == EAGER_MEMORY_NOTE
                                                      else "")
            line = (f"| {r['backbone']} | {r['size']} | {r['model']} | {r['engine']} | {_fmt(r['peak_mem_mb'], '.0f')} | "
                    f"{_fmt(r['mem_delta_mb'], '.0f')} | {kind} |")
            if device_level:
                line += f" {_fmt(r.get('device_used_delta_mb'), '.0f')} |"
            lines.append(line)
    for r in failed:
        lines.append(f"\nfailed: {r['backbone']} {r['size']} {r['model']}/{r['engine']}: {r['error']}")
    return "\n".join(lines)
