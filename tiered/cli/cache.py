"""`tiered cache list|rm`: the layouts that `run -m CHECKPOINT` repacked into $XDG_CACHE_HOME/tiered.

Owns: the `cache` click group (listing as a table or JSON, removing by key or everything).
Does not own: what an entry is or how removal is limited to the cache (tiered/layout/cachedir.py).
"""
from __future__ import annotations

import json

import click

def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@click.group("cache", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cache() -> None:
    """Show or prune the layouts repacked for `run -m CHECKPOINT`.

    A checkpoint given to `run`, `trace` or `tune` is repacked once into $XDG_CACHE_HOME/tiered
    (default ~/.cache/tiered), keyed by its path, its files' sizes and mtimes and the repack options.
    A changed checkpoint gets a new copy; the old one stays until removed here.

    \b
    Examples:
      tiered cache list
      tiered cache rm olmoe-code-17m-9b2ad4d7ce0e5146
      tiered cache rm --all
    """


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry, one per line.")
def list_cmd(as_json: bool) -> None:
    """List the cached layouts: key, size, state and source checkpoint.

    \b
    States:
      current   the checkpoint is unchanged: `run -m` uses this copy
      stale     the checkpoint changed since: a newer copy replaces this one
      orphaned  the checkpoint is gone
      partial   an interrupted repack
      damaged   the manifest cannot be read
    """
    from tiered.layout.cachedir import cache_root, list_cached

    entries = list_cached()
    if as_json:
        for e in entries:
            click.echo(json.dumps(e.to_json()))
        return
    root = cache_root()
    if not entries:
        click.echo(f"the layout cache {root} is empty")
        return
    w = max(len(e.key) for e in entries)
    for e in entries:
        click.echo(f"{e.key:<{w}}  {_size(e.bytes):>9}  {e.state:<8}  {e.source or ''}")
    total = sum(e.bytes for e in entries)
    click.echo(f"{len(entries)} entries, {_size(total)} in {root}; remove with `tiered cache rm KEY` or --all",
               err=True)


@cache.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
def rm_cmd(keys: tuple[str, ...], everything: bool) -> None:
    """Remove cached layouts by KEY (as `tiered cache list` shows them), or all with --all.

    Only entries of the cache are removed; the checkpoints they came from are never touched.
    """
    from tiered.layout.cachedir import cache_root, remove

    if everything == bool(keys):
        raise click.UsageError("give the KEYs to remove (see `tiered cache list`) or --all, not both or neither")
    try:
        gone = remove(list(keys), everything=everything)
    except KeyError as e:
        raise click.UsageError(f"not in the layout cache {cache_root()}: {e.args[0]} "
                               "(see `tiered cache list` for the keys)") from None
    for e in gone:
        click.echo(f"removed {e.path} ({_size(e.bytes)})", err=True)
    click.echo(f"freed {_size(sum(e.bytes for e in gone))}", err=True)
