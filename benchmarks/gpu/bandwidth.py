"""Section ``bandwidth``: the card, and the figures the bytes model assumes, measured.

* copy: a 1 GiB device-to-device copy, the 100 % of every "% of copy";
* L2 flush check: a copy that fits in L2 timed right after each kind of flush (none, a read of a clean buffer, the
  old ``zero_()``), so the run shows that its cold-L2 times are cold and what the old flush added;
* L2 read bandwidth: every SM re-reading its slice of a quarter of L2;
* one SM's read bandwidth against the bytes in flight (16 to 128 KiB): a port cap only where the curve flattens.

The model is then re-run with the measured bandwidths (``card_measured``): copy for HBM, L2 read for L2, and the
per-SM figure only when the sweep saturated (otherwise the assumed cap stays, and the record says so).
"""
from __future__ import annotations

import dataclasses

NAME, DEADLINE = "bandwidth", 0.25  # late enough to run after a split-d smoke that hung for its whole timeout
# copy bytes, per-SM probe bytes (over 8 programs) and L2 probe passes: the card's, and the dry run's (host memory,
# interpreted probe kernels: one block per program); the dry run's stand-in for the L2 size
SIZES = {False: dict(copy=1 << 30, per_sm=1 << 28, l2_passes=50), True: dict(copy=8 << 20, per_sm=0, l2_passes=2)}
DRY_L2_BYTES = 1 << 20


def run(sec, ctx) -> dict:
    """Every figure joins the record as soon as it is measured; a probe that fails leaves the others."""
    import torch

    from benchmarks import timing
    from benchmarks.gpu.record import error_fields, error_text
    from finesteer_kernels.perf_model import DEFAULT_CARD, card_for_device

    device, sizes = ctx.device, SIZES[ctx.dry]
    card = card_for_device(device) if ctx.gpu else DEFAULT_CARD
    l2_bytes = DRY_L2_BYTES if ctx.dry else card.l2_bytes
    record = sec.record
    record.update(device=str(device), peak_gbps=timing.card_peak_gbps(device), card=dataclasses.asdict(card))
    if ctx.gpu:
        props = torch.cuda.get_device_properties(device)
        record.update(name=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                      l2_bytes_reported=getattr(props, "L2_cache_size", None))
    else:
        record["name"] = "CPU (dry run: host copy bandwidth, not a GPU figure)"
    probes = {"copy": lambda: timing.copy_bandwidth_gbps(device, nbytes=sizes["copy"]),
              "flush_check": lambda: timing.l2_flush_check(device, l2_bytes, reps=ctx.reps(20)),
              "l2": lambda: timing.l2_read_bandwidth_gbps(device, l2_bytes, reps=sizes["l2_passes"]),
              "per_sm": lambda: timing.per_sm_read_sweep(device, nbytes=sizes["per_sm"])}
    failed = []
    for name, probe in probes.items():  # each on its own: one that fails leaves the others
        sec.starting(name)
        try:
            record[name] = probe()
        except Exception as e:
            record[name] = error_fields(e)
            failed.append(f"{name}: {error_text(e)}")
        sec.run.save()
    if "gbps" in record["copy"]:
        replaced = dict(hbm_gbps=record["copy"]["gbps"])
        if "gbps" in record["l2"]:
            replaced["l2_gbps"] = record["l2"]["gbps"]
        if record["per_sm"].get("saturated"):
            replaced["sm_gbps"] = record["per_sm"]["gbps_per_sm"]
        record["card_measured"] = dataclasses.asdict(dataclasses.replace(card, **replaced))
        record["card_measured_note"] = (
            "measured: " + ", ".join(replaced) + "; assumed: the rest"
            + ("" if "sm_gbps" in replaced else " (the per-SM sweep did not saturate: the one-SM cap stays assumed)"))
    if failed:
        raise RuntimeError("; ".join(failed))
    return {}


def model_cards(results: dict):
    """(the model's card as shipped, the card with this run's measured bandwidths) for predictions; the default
    card when the bandwidth section could not run."""
    from finesteer_kernels.perf_model import DEFAULT_CARD, Card

    bw = results["sections"].get(NAME, {})
    shipped = Card(**bw["card"]) if "card" in bw else DEFAULT_CARD
    measured = Card(**bw["card_measured"]) if "card_measured" in bw else shipped
    return shipped, measured


def copy_gbps(results: dict):
    """The measured copy bandwidth (GB/s), or None."""
    return (results["sections"].get(NAME, {}).get("copy") or {}).get("gbps")


def markdown(results: dict) -> list:
    from benchmarks.report import fmt

    bw = results["sections"].get(NAME, {})
    if "gbps" not in bw.get("copy", {}):
        return []
    l2, per_sm, flush = bw.get("l2", {}), bw.get("per_sm", {}), bw.get("flush_check", {})
    lines = ["", f"**Bandwidth** ({bw['name']}): copy {bw['copy']['gbps']:.0f} GB/s (peak {bw['peak_gbps']}), "
             f"L2 read {fmt(l2.get('gbps'), '.0f')} GB/s (model assumed {bw['card']['l2_gbps']:.0f}); "
             f"{bw.get('card_measured_note', '')}"]
    if "warm" in flush:
        lines.append(f"- L2 flush check, copy of {flush['bytes'] / 2**20:.1f} MiB: warm "
                     f"{flush['warm']['median_us']:.1f} us, after reading a clean buffer "
                     f"{flush['read_flush']['median_us']:.1f} us, after zero_() {flush['zero_flush']['median_us']:.1f}"
                     f" us (flush evicts: {fmt(flush['flush_evicts'])}; the old flush added "
                     f"{100 * (flush['zero_flush_over_read_flush'] - 1):+.0f} %)")
    if per_sm.get("rows") and "gbps_per_sm" in per_sm:
        points = ", ".join(f"{r['in_flight_bytes'] // 1024} KiB: {fmt(r.get('gbps_per_sm'), '.0f')}"
                           for r in per_sm["rows"])
        lines.append(f"- one SM's read bandwidth by bytes in flight (GB/s): {points}; saturated: "
                     f"{fmt(per_sm.get('saturated'))} (model assumed {bw['card']['sm_gbps']:.0f} GB/s)")
    return lines
