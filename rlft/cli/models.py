"""``rlft models``: list the offline registry and pull aliases into the local cache."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from rlft.models.registry import REGISTRY, cache_dir, cached_path, pull


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="rlft models", description="Offline model registry.")
    commands = parser.add_subcommands(dest="command")
    pull_parser = ArgumentParser(description="Download/convert a registry model and print its local folder.")
    pull_parser.add_argument("name", choices=sorted(REGISTRY), help="registry alias")
    pull_parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    commands.add_subcommand("pull", pull_parser, help="make a model available offline; prints its path")
    commands.add_subcommand("list", ArgumentParser(description="List aliases and whether they are cached."))
    args = parser.parse_args(argv)
    if args.command == "pull":
        print(pull(args.pull.name, force=args.pull.force))
        return
    print(f"cache: {cache_dir()}")
    for name, entry in REGISTRY.items():
        status = "cached" if cached_path(name) else "not pulled"
        print(f"{name:<24} {status:<11} {entry.description}")
