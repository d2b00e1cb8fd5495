"""Upload a Hub folder written by `polynext export --format hub` to the Hugging Face Hub.

  polynext push hub/cpolynext_s USER/cpolynext_s
  polynext push hub/cpolynext_s ORG/cpolynext_s --private --token hf_...

The folder is checked first (config.json present, the weights matching the model it describes);
its model card gets the repository's load line. Needs a login (`hf auth login`) or --token, and
the network; with HF_HUB_OFFLINE=1 it stops with one message.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('folder', metavar='DIR', help='a folder written by polynext export --format hub')
    parser.add_argument('repo', metavar='REPO', help='the Hub repository, USER/NAME or ORG/NAME (created if needed)')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--token', default=None, help='a Hugging Face token (default: the login of `hf auth login`)')
    parser.add_argument('--message', default='Upload polynext model', help='the commit message')


def run(args: argparse.Namespace) -> int:
    from ..deploy.hub import push_to_hub
    url = push_to_hub(args.folder, args.repo, token=args.token, private=args.private, commit_message=args.message)
    print(f'uploaded {args.folder} to {url}')
    print(f'load it with: import polynext, timm; timm.create_model("hf-hub:{args.repo}", pretrained=True)')
    return 0
