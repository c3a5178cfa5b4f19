"""``pissa push PATH REPO_ID``: parse options, call :func:`converter.push.push`, print what it did."""

from __future__ import annotations

import click

from pissa.commands.common import human_bytes


@click.command("push")
@click.argument("path", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (ignored if it exists).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--message", "-m", default=None, help="Commit message.")
def push(path: str, repo_id: str, private: bool, revision: str | None, create_pr: bool, message: str | None) -> None:
    """Verify PATH (a bundle or an exported adapter) and push it to the Hub as REPO_ID.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub. Re-running
    resumes: files already on the Hub are not sent again.
    """
    from converter.push import push as run_push

    report = run_push(path, repo_id, private=private, revision=revision, create_pr=create_pr, message=message)
    if report.uploaded:
        click.echo(
            f"pushed {report.kind} {report.path} to {report.repo_id}@{report.revision}: "
            f"{len(report.uploaded)} files ({human_bytes(report.bytes_uploaded)}) uploaded, "
            f"{len(report.unchanged)} unchanged, in {report.seconds:.1f} s"
        )
    else:
        click.echo(f"{report.repo_id}@{report.revision} is up to date: all {len(report.unchanged)} files unchanged")
    if report.pr_url:
        click.echo(f"pull request: {report.pr_url}")
    elif report.commit_url:
        click.echo(f"commit: {report.commit_url}")
