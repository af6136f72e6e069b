"""``soda-nvs push``: share a saved pipeline on the Hugging Face Hub, with its model card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a saved pipeline to the Hugging Face Hub, with a model card",
        description="Upload a saved pipeline folder (a training output folder works: its train_summary.json, "
        "train_config.json, metrics.json and samples/ go into the model card) to a Hub model repo. The repo "
        "loads with SODANovelViewPipeline.from_pretrained, and without soda-diffusers with "
        "DiffusionPipeline.from_pretrained(..., trust_remote_code=True). The upload adds one commit and "
        "deletes nothing in the repo. Needs a token: `hf auth login` or HF_TOKEN.",
    )
    parser.add_argument("--pipeline", required=True, help="a saved pipeline folder (save_pretrained)")
    parser.add_argument("--repo-id", required=True, help="the Hub model repo, user/name")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--metrics", help="an evaluation metrics.json (default: PIPELINE/metrics.json if present)")
    parser.add_argument(
        "--samples", nargs="+", metavar="IMAGE",
        help="images to show in the card, e.g. orbit.gif from `soda-nvs generate` (default: PIPELINE/samples/)",
    )
    parser.add_argument("--dataset", help="the Hub dataset id of the training data, for the card's metadata")
    parser.add_argument("--commit-message", help="the commit message")
    parser.add_argument(
        "--space", metavar="USER/NAME",
        help="also publish the demo (soda-nvs demo) as a Gradio Space serving --repo-id: app.py, the demo's code "
        "(soda_demo/), requirements.txt and the Space's README.md",
    )
    parser.add_argument(
        "--dry-run", metavar="DIR",
        help="write the folder that would be uploaded to DIR, upload nothing (with --space: DIR/model and DIR/space)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from soda_diffusers.hub import (
        HubUploadError,
        export_for_hub,
        export_space,
        load_pipeline,
        new_or_empty_folder,
        push_space,
        push_to_hub,
    )

    if not Path(args.pipeline).is_dir():
        raise FileNotFoundError(f"--pipeline: no folder {args.pipeline}")
    if args.metrics and not Path(args.metrics).is_file():
        raise FileNotFoundError(f"--metrics: no file {args.metrics}")
    if args.dry_run:
        new_or_empty_folder(args.dry_run)  # before loading anything
    # Loaded once for the model export and the Space's; the folder still supplies the card's training files.
    pipe = load_pipeline(args.pipeline)
    export_kwargs = {"metrics": args.metrics, "samples": args.samples, "dataset": args.dataset,
                     "training_dir": args.pipeline}
    if args.dry_run:
        out = Path(args.dry_run)
        model_dir = out / "model" if args.space else out
        folders = [(export_for_hub(pipe, model_dir, repo_id=args.repo_id, **export_kwargs), args.repo_id)]
        if args.space:
            folders.append((export_space(pipe, out / "space", args.repo_id), f"the Space {args.space}"))
        for folder, target in folders:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            print(f"wrote {folder}: {len(files)} files, {megabytes:.1f} MB, the folder `push` would upload to {target}")
        if args.space:
            print(f"try the Space's app on the model folder: SODA_PIPELINE={model_dir} python {out / 'space' / 'app.py'}")
        print("dry run: nothing was uploaded")
        return 0
    try:
        commit = push_to_hub(
            pipe, args.repo_id, private=True if args.private else None, commit_message=args.commit_message,
            **export_kwargs,
        )
    except HubUploadError as error:
        print(f"soda-nvs {args.command}: error: {error}", file=sys.stderr)
        return 1
    print(f"uploaded: {commit.commit_url}")
    if args.space:
        # The model repo's id as create_repo completed it (a bare name gets the user's namespace).
        model_id = getattr(getattr(commit, "repo_url", None), "repo_id", None) or args.repo_id
        try:
            space_commit = push_space(pipe, args.space, model_id, private=True if args.private else None,
                                      commit_message=args.commit_message)
        except HubUploadError as error:
            print(f"soda-nvs {args.command}: error: {error}", file=sys.stderr)
            return 1
        print(f"uploaded the Space: {space_commit.commit_url}")
    return 0
