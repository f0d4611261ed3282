"""``--push_to_hub``: a finished run's folder uploaded to a Hugging Face Hub model repo, as diffusers' training scripts
do (``--hub_model_id``, default the output folder's name; ``--hub_token``, default the logged-in token)."""

from __future__ import annotations

from pathlib import Path

from genunlearn.errors import UserError

LEFT_OUT = ["checkpoints/**", "*.lock", "**/.staging-*", "run.log"]  # resumable state and local logs stay local


def push_run(output_dir: Path, repo_id: str | None, token: str | None = None) -> str:
    """Create (or reuse) the model repo ``repo_id`` and upload ``output_dir`` into it: the model card README.md, the
    weights folder, report.json/md and the figures. Returns the repo's URL; a UserError naming the fix on failure
    (the run's files stay in ``output_dir`` either way)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = repo_id or output_dir.resolve().name
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), repo_type="model", ignore_patterns=LEFT_OUT,
                          commit_message=f"genunlearn run {output_dir.name}")
    except (OSError, HfHubHTTPError, ValueError) as exc:
        raise UserError(f"could not push {output_dir} to the Hub repo {repo_id} ({type(exc).__name__}: {str(exc)[:150]}); "
                        "log in with `hf auth login` or pass --hub_token, check --hub_model_id and the network, then push "
                        f"the finished folder with `hf upload {repo_id} {output_dir}`") from None
    return str(url)
