"""A run folder's model card: ``README.md`` in the Hugging Face Hub's style (YAML metadata, then what was done)."""

from __future__ import annotations

from pathlib import Path

from genunlearn.methods import get_method
from genunlearn.models.presets import ClassifierPreset
from genunlearn.tasks.classifier import SMALL_STEM_REBUILD

FIGURES = ("forget_acc", "retain_acc", "test_acc", "mia", "forget_entropy", "remain_acc", "fid_remain", "heldout_acc", "fid_heldout",
           "paraphrase_acc", "forget_ink")
def classifier_loading(loadable: str, preset: ClassifierPreset, num_classes: int) -> str:
    """How the run's ``model/`` folder loads, for ``loadable`` as ``genunlearn.save_classifier`` returned it."""
    if loadable == "timm":
        return ("`model/` is in timm's hub layout: `timm.create_model(\"local-dir:RUN/model\")` returns the unlearned "
                "network (class names in `config.json`'s `label_names`, input size and normalisation in its `pretrained_cfg`).")
    if loadable == "timm-after-import":
        return (f"`model/` is in timm's hub layout for `{preset.timm_name}`, an architecture genunlearn registers with timm: "
                "after `import genunlearn.models.cnn` (which registers it), `timm.create_model(\"local-dir:RUN/model\")` returns "
                "the unlearned network.")
    lines = [f"`model/model.safetensors` holds the state dict, which timm cannot rebuild from arguments alone "
             f"({'a replaced stem' if preset.stem else 'parameters timm does not create'}): "
             f"`genunlearn.load_task(\"{preset.name}\", pretrained=\"RUN/model\")` loads it."]
    if preset.stem == "cifar":
        lines.append(f"With timm and torch alone: `m = timm.create_model(\"{preset.timm_name}\", num_classes={num_classes}, "
                     f"in_chans={preset.channels})`, `{SMALL_STEM_REBUILD.format(channels=preset.channels)}`, then "
                     "`m.load_state_dict(safetensors.torch.load_file(\"RUN/model/model.safetensors\"))`.")
    return " ".join(lines)


def forgotten_part(report: dict) -> str:
    """What the run forgot, in words: ``class 3``, ``class 1 ('3')`` (label 1 is the folder ``3``), ``random 0.1``,
    ``concept 'a handwritten digit three'``."""
    if report["kind"] == "text-to-image":
        return f"concept {report['class']!r}" if isinstance(report["class"], str) else f"concepts {report['class']}"
    split = report["split"]
    ids, names = split.get("classes", []), split.get("class_names", [])
    named = [f"{i} ({name!r})" for i, name in zip(ids, names) if name != str(i)]
    if named and len(names) == len(ids):  # a label whose name is not its id: say which folder it was
        shown = [f"{i} ({name!r})" if name != str(i) else str(i) for i, name in zip(ids, names)]
        return f"{split['kind']} {shown[0] if len(shown) == 1 else '[' + ', '.join(shown) + ']'}"
    return f"{split['kind']} {report['class']}"


def diffusion_loading(pipeline_class: str, denoiser_class: str, code_sha256: str | None = None) -> str:
    """How the run's ``pipeline/`` folder loads with diffusers alone, for a pipeline and denoiser of those classes,
    the loads that run no code first; ``code_sha256``: the hash of the ``pipeline.py`` written beside a custom
    pipeline, which loading it would run."""
    subfolder = "transformer" if pipeline_class == "DiTPipeline" else "denoiser"
    denoiser = f'`{denoiser_class}.from_pretrained("RUN/pipeline", subfolder="{subfolder}")`'
    if pipeline_class == "DiTPipeline":
        loads = (f'With diffusers alone, running no code from the folder: `DiTPipeline.from_pretrained("RUN/pipeline")`, '
                 f"or the denoiser alone: {denoiser}.")
    else:
        loads = (f"With diffusers alone, running no code from the folder, the denoiser: {denoiser}. The folder also "
                 f"holds its pipeline's code as `pipeline.py` (SHA-256 `{code_sha256}`); check that hash before "
                 'running it, since loading it executes the file: `DiffusionPipeline.from_pretrained("RUN/pipeline", '
                 'custom_pipeline="RUN/pipeline/pipeline.py", trust_remote_code=True)` (`pipe(class_labels, '
                 "guidance_scale, num_inference_steps, generator, output_type)` samples PIL images, or \"np\"/\"pt\" arrays in [0, 1] as "
                 "diffusers' pipelines do; the null class of "
                 "guidance is the last id).")
    return (f"`pipeline/` is a diffusers pipeline folder. {loads} In genunlearn, which never runs the folder's code: "
            '`genunlearn.diffusion_task("RUN/pipeline", train, test)`.')


def model_card(report: dict, base_model: str | None = None, loading: str = "") -> str:
    """The card (a ``huggingface_hub.ModelCard``'s text: YAML metadata, then markdown) of the run ``report``
    describes; ``base_model``: the weights it started from (a hub id or folder; only a hub id goes in the metadata);
    ``loading``: how its weights load (``classifier_loading``, ``diffusion_loading``)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_id = base_model and "/" in base_model and not base_model.startswith(("/", ".")) and not Path(base_model).exists()
    metadata = ModelCardData(library_name="timm" if report["kind"] == "classifier" else "diffusers",
                             tags=["genunlearn", "machine-unlearning", report["method"]],
                             base_model=base_model if hub_id else None)
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{model_card_body(report, base_model, loading)}"))


def model_card_body(report: dict, base_model: str | None, loading: str) -> str:
    """The card's markdown: what was forgotten, how, the headline figures before and after, how the files load."""
    before, after = report["before"], report["after"]
    rows = [f"| {key} | {before[key]:.4f} | {after[key]:.4f} |" for key in FIGURES
            if isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float))]
    lines = [f"# {report['model']} without {forgotten_part(report)}", "",
             f"Unlearned by genunlearn {report['genunlearn_version']} with `{report['method']}` "
             f"({get_method(report['method']).summary}): {report['steps']} iterations in {report['wall_time_s']:.1f} s on "
             f"{report['processes']} process(es), starting from {base_model or 'the preset ' + report['model'] + ' as genunlearn pretrains it'}.",
             "", "| figure | before | after |", "|---|---|---|", *rows, ""]
    if report["kind"] == "text-to-image":
        protocol = report["evaluation"]
        lines += [f"Concept figures: {protocol['per_prompt']} generations per prompt, {protocol['steps']} DDIM steps, guidance "
                  f"{protocol['guidance']}, judged by {protocol['classifier']}; FID against {protocol['fid_reference']}.", ""]
    elif "evaluation" in report:
        protocol = report["evaluation"]
        lines += [f"Generator figures: {protocol['per_class']} samples per class, {protocol['sampler']} {protocol['steps']} steps, "
                  f"guidance {protocol['guidance']}, judged by {protocol['classifier']}; FID ({protocol['fid_features']}) "
                  f"against {protocol['fid_reference']}.", ""]
    if report.get("attacks"):
        lines += ["Attacks on the erasure (attack success rate, the judge's, plain → attacked): " + "; ".join(
            f"{name} {a['pre_asr']:.2f} → {a['post_asr']:.2f} (n = {a['samples']})" for name, a in report["attacks"].items()) + ".", ""]
    cost = report.get("cost")
    if cost:
        memory = f"CUDA peak {cost['cuda_peak_mib']['overall']:.0f} MiB" if cost["cuda_peak_mib"] else f"peak RSS {cost['peak_rss_mib']:.0f} MiB"
        lines += [f"Cost: {cost['total_s']:.0f} s for the whole run on {cost['device']} ({memory}); "
                  f"{cost.get('output_mib', 0.0):.1f} MiB written (`report.md` splits the time by stage).", ""]
    lines += ["## Files", "", loading, "", "`report.json` / `report.md` hold every figure, the split, the "
              "method's settings and the per-step log.", ""]
    return "\n".join(lines)
