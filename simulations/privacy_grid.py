"""Privacy-utility grid: federated NDCG@10 / Recall@10 per epsilon, for two ways of holding user vectors.

``python -m fedsocial.simulations.privacy_grid --config configs/lastfm_dp.toml --data-dir ../shared/datasets
[--epsilons 1,2,4,8,inf] [--variants local,trained] [--partners 5] [--set ...] --out runs/grid_lastfm``

Each cell is one ``fedsocial simulate`` run of ``--config`` (5 partners by default) with
``privacy.max_epsilon`` set to the cell's epsilon (noise calibrated so the last round reaches it) and
``model.user_embedding`` set to the variant: ``local`` (joint DP: p_u reconstructed on the partner from
the user's own items, never DP-trained) or ``trained`` (a per-user table trained under DP with the
shared parameters). ``inf`` runs the same schedule without privacy. MostPop (popularity counted over
all training interactions) is the floor. A cell already in ``OUT/grid.json`` is kept only if it was
run with the same resolved config (its SHA-256 is stored with it), so an interrupted grid continues
where it stopped and a changed config or override reruns the cells it changes; a cell folder left
by an interrupted or outdated run is moved aside (``<cell>.replaced-N``), never reused or deleted.
Prints a markdown table and writes ``OUT/report.html`` (NDCG@10 against epsilon per scope, the tables)
after every cell.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsocial.shared.config import Config, load_config
from fedsocial.shared.fileio import write_json_atomic, write_text_atomic
from fedsocial.simulations.common import user_errors
from fedsocial.simulations.fed_bench import run_centralized
from fedsocial.simulations.report import format_number, render_page, render_table, svg_line_plot
from fedsocial.simulations.simulate import METRIC_KEYS, run_simulation_from_config


def compute_cell_overrides(epsilon: float, variant: str) -> list[str]:
    """The config overrides of one grid cell (epsilon = inf turns privacy off)."""
    sets = [f"model.user_embedding={variant}"]
    if math.isinf(epsilon):
        return [*sets, "privacy.enabled=false"]
    return [*sets, "privacy.enabled=true", f"privacy.max_epsilon={epsilon}"]


def run_cell(cfg: Config, data_dir: str | None, out: Path) -> dict[str, Any]:
    doc = run_simulation_from_config(cfg, data_dir, out, progress=True)
    res: dict[str, Any] = {k: float(doc[k]) for k in METRIC_KEYS}
    res.update(epsilon=doc.get("epsilon"), wall_time_s=doc.get("simulation_wall_time_s"),
               noise_multiplier=_noise_multiplier(doc))
    if "federation_gain" in doc:  # --set federation.compare_alone=true
        res.update(federation_gain=doc["federation_gain"], scope=cfg.privacy.scope,
                   per_partner=compute_partner_summary(doc))
    return res


def compute_partner_summary(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per partner NDCG@10: alone, shared-only (the joint-scope model), served, and the served model's name."""
    out = {}
    for pid, info in sorted(doc.get("partners", {}).items()):
        if not isinstance(info, dict) or "alone" not in info:
            continue
        personal = info.get("personalisation", {})
        out[pid] = {"num_users": info.get("num_users"), "alone": info["alone"]["ndcg@10"],
                    "served": info.get("served", info).get("ndcg@10"), "choice": personal.get("choice", "shared"),
                    "shared": personal.get("shared_test", {}).get("ndcg@10", info.get("ndcg@10"))}
    return out


PARTNER_HEADER = ("epsilon", "partner", "users", "alone", "shared-only = joint served", "partner-scope served",
                  "served model", "served / alone")
CELL_HEADER = ("epsilon", "user vectors", "NDCG@10", "Recall@10", "sigma", "wall s")


def compute_partner_rows(results: dict[str, Any], epsilons: list[float], variants: list[str]) -> list[list[str]]:
    """Per epsilon and partner, alone / shared-only (= joint scope served) / served, and the gain (bold marks
    on the mean row, as markdown shows it)."""
    rows = []
    for eps in sorted(epsilons):
        for variant in variants:
            res = results.get(cell_key(eps, variant))
            if not isinstance(res, dict) or "per_partner" not in res:
                continue
            for pid, p in res["per_partner"].items():
                if p.get("served") is None:  # a cell summarised before served metrics were recorded
                    continue
                ratio = p["served"] / p["alone"] if p["alone"] else math.inf
                rows.append([f"{eps:g}", pid, str(p["num_users"]), f"{p['alone']:.4f}", f"{p['shared']:.4f}",
                             f"{p['served']:.4f}", str(p["choice"]), f"{ratio:.3f}"])
            rows.append([f"{eps:g}", "**mean gain**", "", "", "", "", "", f"**{res['federation_gain']:.3f}**"])
    return rows


def compute_markdown(header: Sequence[str], rows: list[list[str]]) -> str:
    """A markdown table of ``header`` and string ``rows``."""
    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def partner_table(results: dict[str, Any], epsilons: list[float], variants: list[str]) -> str:
    """Markdown: per epsilon and partner, alone / shared-only (= joint scope served) / served, and the gain."""
    return compute_markdown(PARTNER_HEADER, compute_partner_rows(results, epsilons, variants))


def compute_user_weighted_mean(per_partner: dict[str, dict[str, Any]], key: str) -> float:
    """The mean of one per-partner NDCG@10 column, weighted by each partner's users (a pooled mean)."""
    rows = [(float(p["num_users"] or 0), p[key]) for p in per_partner.values() if p.get(key) is not None]
    weight = sum(w for w, _ in rows)
    return sum(w * v for w, v in rows) / weight if weight > 0 else math.nan


def compute_epsilon_series(results: dict[str, Any], epsilons: list[float], variants: list[str],
                           ) -> tuple[list[float], dict[str, list[float]]]:
    """NDCG@10 against the finite epsilons, one series per curve: each variant's served NDCG@10 (named by
    its scope), and where partners were compared with themselves alone the joint scope's model (the
    shared-only column) and alone, pooled over partners; MostPop as a flat line."""
    xs = sorted(e for e in epsilons if math.isfinite(e))
    series: dict[str, list[float]] = {}
    for variant in variants:
        cells = [results.get(cell_key(e, variant)) for e in xs]
        scope = next((c.get("scope") for c in cells if isinstance(c, dict) and c.get("scope")), "joint")
        tag = f" ({variant})" if len(variants) > 1 else ""
        series[f"{scope} scope served{tag}"] = [c["ndcg@10"] if isinstance(c, dict) else math.nan for c in cells]
        if any(isinstance(c, dict) and "per_partner" in c for c in cells):
            for name, key in ((f"joint scope{tag}", "shared"), (f"alone{tag}", "alone")):
                series[name] = [compute_user_weighted_mean(c["per_partner"], key)
                                if isinstance(c, dict) and "per_partner" in c else math.nan for c in cells]
    if isinstance(results.get("mostpop"), dict):
        series["MostPop"] = [float(results["mostpop"]["ndcg@10"])] * len(xs)
    return xs, series


def render_grid_report(results: dict[str, Any], epsilons: list[float], variants: list[str]) -> str:
    """The grid as an HTML page: NDCG@10 against epsilon per scope, the cell table, the per-partner table."""
    xs, series = compute_epsilon_series(results, epsilons, variants)
    at = [math.log2(e) for e in xs]  # epsilons double from cell to cell: a log axis spaces them evenly
    plot = (svg_line_plot("NDCG@10 against epsilon", at, series, width=620, height=300,
                          x_label="epsilon (log scale)", x_ticks=[(a, f"{e:g}") for a, e in zip(at, xs, strict=True)])
            if xs else "<p>no finite-epsilon cell yet</p>")
    non_private = [f"{v}: {format_number(results[cell_key(math.inf, v)]['ndcg@10'])}" for v in variants
                   if isinstance(results.get(cell_key(math.inf, v)), dict)]
    sections = [f"<h1>Privacy-utility grid: {html.escape(str(results.get('config', '')))}</h1>",
                f"<p>{html.escape(str(results.get('partners', '')))} partners; overrides: "
                f"{html.escape(' '.join(results.get('overrides', [])) or 'none')}</p>",
                '<div class="plots">' + plot + "</div>",
                f"<p>without privacy (epsilon inf): {html.escape('; '.join(non_private) or 'not run')}</p>",
                "<h2>Cells</h2>", compute_html_table(CELL_HEADER, compute_cell_rows(results, epsilons, variants))]
    if any(isinstance(v, dict) and "per_partner" in v for v in results.values()):
        sections += ["<h2>Per partner: alone, joint scope, partner scope</h2>",
                     compute_html_table(PARTNER_HEADER, compute_partner_rows(results, epsilons, variants))]
    return render_page("fedsocial privacy-utility grid", sections)


def compute_html_table(header: Sequence[str], rows: list[list[str]]) -> str:
    """The rows of a markdown table as an HTML table (bold marks dropped; cells escaped by render_table)."""
    return render_table(header, [[c.replace("**", "") for c in r] for r in rows])


def _noise_multiplier(doc: dict[str, Any]) -> float | None:
    sigmas = [p.get("noise_multiplier") for p in doc.get("partners", {}).values() if isinstance(p, dict)]
    found = [float(s) for s in sigmas if isinstance(s, (int, float))]
    return max(found) if found else None


def parse_epsilons(text: str) -> list[float]:
    return [float(tok) for tok in text.split(",") if tok.strip()]  # float("inf") parses "inf"


def compute_cell_rows(results: dict[str, Any], epsilons: list[float], variants: list[str]) -> list[list[str]]:
    """MostPop, then one row per cell in epsilon order: NDCG@10, Recall@10, sigma, wall time."""
    rows = []
    if "mostpop" in results:
        mp = results["mostpop"]
        rows.append(["–", "MostPop", f"{mp['ndcg@10']:.4f}", f"{mp['recall@10']:.4f}", "–", f"{mp['wall_time_s']:.0f}"])
    for eps in sorted(epsilons):
        for variant in variants:
            res = results.get(cell_key(eps, variant))
            if res is None:
                continue
            sigma = "–" if res.get("noise_multiplier") is None else f"{res['noise_multiplier']:.2f}"
            rows.append([f"{eps:g}", variant, f"{res['ndcg@10']:.4f}", f"{res['recall@10']:.4f}", sigma,
                         f"{res['wall_time_s'] or 0:.0f}"])
    return rows


def markdown_table(results: dict[str, Any], epsilons: list[float], variants: list[str]) -> str:
    return compute_markdown(CELL_HEADER, compute_cell_rows(results, epsilons, variants))

def cell_key(epsilon: float, variant: str) -> str:
    return f"eps={epsilon:g}/{variant}"


def compute_config_sha256(cfg: Config) -> str:
    """Fingerprint of a resolved config (every section and key), to tell a cached cell's config apart."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def is_cached(results: dict[str, Any], key: str, config_sha256: str) -> bool:
    cell = results.get(key)
    return isinstance(cell, dict) and cell.get("config_sha256") == config_sha256


def move_aside(run_dir: Path) -> Path | None:
    """Rename a non-empty earlier cell folder to ``<name>.replaced-N`` (the first free N); None if nothing there."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.replaced-{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.replaced-{n}")
    run_dir.rename(target)
    return target


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privacy_grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epsilons", default="1,2,4,8,inf")
    parser.add_argument("--variants", default="local,trained")
    parser.add_argument("--partners", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-mostpop", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    grid_path = out / "grid.json"
    results: dict[str, Any] = json.loads(grid_path.read_text(encoding="utf-8")) if grid_path.is_file() else {}
    results.update(config=args.config, partners=args.partners, overrides=args.overrides)
    extra = [*args.overrides, f"federation.partners={args.partners}"]
    epsilons, variants = parse_epsilons(args.epsilons), [v for v in args.variants.split(",") if v]
    if not args.no_mostpop and "mostpop" not in results:
        results["mostpop"] = run_centralized(load_config(args.config, [*extra, "model.name=mostpop"]),
                                             args.data_dir)
        write_json_atomic(grid_path, results)
    for eps in epsilons:
        for variant in variants:
            key = cell_key(eps, variant)
            cfg = load_config(args.config, [*extra, *compute_cell_overrides(eps, variant)])
            sha = compute_config_sha256(cfg)
            if is_cached(results, key, sha):
                continue
            t0 = time.perf_counter()
            run_dir = out / key.replace("=", "").replace("/", "-")
            moved = move_aside(run_dir)  # its ledgers would otherwise count against the new run
            if moved is not None:
                print(f"{key}: earlier folder moved to {moved}", flush=True)
            results[key] = {**run_cell(cfg, args.data_dir, run_dir), "config_sha256": sha}
            print(f"{key}: ndcg@10 {results[key]['ndcg@10']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_json_atomic(grid_path, results)
            write_text_atomic(out / "report.html", render_grid_report(results, epsilons, variants))
    write_text_atomic(out / "report.html", render_grid_report(results, epsilons, variants))
    print(markdown_table(results, epsilons, variants))
    if any(isinstance(v, dict) and "per_partner" in v for v in results.values()):
        print()
        print(partner_table(results, epsilons, variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
