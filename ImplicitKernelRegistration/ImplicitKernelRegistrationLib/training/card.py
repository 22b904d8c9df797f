"""The model card written beside a trained kernel's weights."""

from __future__ import annotations

from .cases import source_name


def model_card(result: dict) -> str:
    """Markdown model card: data, command, seed, validation TRE per family and kernel variant."""
    cfg = result["config"]
    val = result["validation"]
    lines = [
        "# IKR learned kernel: model card",
        "",
        f"- Format: ikr-kernel-v1; {result['n_parameters']:,} parameters; heads: {cfg['kernel']['heads']}; "
        f"K = {cfg['kernel']['k']}; features: MIND-SSC ({cfg['kernel']['feat_dim']} channels).",
        f"- Seed: {cfg['seed']}; steps: {cfg['steps']}; {result['n_train_cases']} training and "
        f"{result['n_val_cases']} validation cases; {result['seconds'] / 60:.1f} min on "
        f"{cfg['threads']} CPU thread(s).",
        f"- Command: `{result.get('command', 'ikr train')}`",
        "",
        "## Data",
        "",
        "Synthetic deformations (families: " + ", ".join(cfg["families"]) + ") of these sources, on a "
        f"{' / '.join(str(s) for s in cfg['working_spacings_mm'])} mm working grid: "
        + ", ".join(f"`{source_name(s)}`" for s in cfg["sources"])
        + ".",
        f"Held out of training: the family `{val['held_out_family']}` and the source(s) "
        + (", ".join(f"`{s}`" for s in val["held_out_sources"]) or "none")
        + ".",
        "Keys are true keypoint displacements corrupted like real matches (noise "
        f"{cfg['noise_vox'][0]}-{cfg['noise_vox'][1]} voxels, outliers {cfg['outlier_fraction'][0]:.0%}-"
        f"{cfg['outlier_fraction'][1]:.0%}, confidences that reflect the corruption); real matches for "
        f"{cfg['match_fraction']:.0%} of cases. Real CTs: POPI (Léon Bérard Cancer Center & CREATIS, Lyon); "
        "TotalSegmentator example (Wasserthal et al. 2023, CC BY 4.0).",
        "",
        "## Validation: mean landmark TRE (mm) on the same keys",
        "",
    ]
    for set_name, title in (
        ("held_out", "Held-out cases (held-out source: every family; held-out family: every source)"),
        ("train_cases", "Training cases (for reference)"),
    ):
        lines += [
            f"### {title}",
            "",
            "| family | n | no registration | learned | TPS | Gaussian |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for fam, row in val.get(set_name, {}).items():
            mark = " (held-out family)" if fam == val["held_out_family"] else ""
            lines.append(
                f"| {fam}{mark} | {row['n_cases']} | {row['none']:.2f} | {row['learned']:.2f} | "
                f"{row['tps']:.2f} | {row['gaussian']:.2f} |"
            )
        lines.append("")
    if result["history"]:
        first, last = result["history"][0], result["history"][-1]
        lines += [
            "## Training curve",
            "",
            f"Endpoint error at training queries: {first['epe_vox']:.3f} voxels (step {first['step']}) -> "
            f"{last['epe_vox']:.3f} voxels (step {last['step']}); on one fixed draw of keys: "
            f"{result['fixed_epe_vox']['start']:.3f} (untrained) -> {result['fixed_epe_vox']['end']:.3f} voxels.",
            "",
        ]
    lines += [
        "## Limits",
        "",
        "Trained on synthetic deformations only (no real image pair with expert landmarks is available "
        "here); the TRE above measures the sparse-to-dense step on corrupted true keys, not the whole "
        "pipeline. The abdomen and liver-slab CTs come from the same public example dataset.",
        "",
    ]
    return "\n".join(lines)
