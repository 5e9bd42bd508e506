from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.workunits.archive import results_archive


class Command(BaseCommand):
    help = (
        "Move the results of jobs that ended more than IDLEGRID_ARCHIVE_AFTER_SECONDS ago, with every earning "
        "settled, out of the hot table into the archive (marketplace/workunits/archive.py). Beat runs the same "
        "every IDLEGRID_ARCHIVE_SECONDS; this runs batches until nothing is left to move (or --runs runs). "
        "Safe to run at any time, twice, or beside beat's."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=None, help="rows per transaction (default IDLEGRID_ARCHIVE_BATCH)")
        parser.add_argument("--batches", type=int, default=None,
                            help="transactions per run (default IDLEGRID_ARCHIVE_BATCHES)")
        parser.add_argument("--runs", type=int, default=1_000_000, help="stop after this many runs (default: until done)")

    def handle(self, *args: Any, batch: int | None, batches: int | None, runs: int, **options: Any) -> None:
        for name, value in (("--batch", batch), ("--batches", batches)):
            if value is not None and not 1 <= value <= 10_000:
                raise CommandError(f"{name} must be between 1 and 10000")
        if runs < 1:
            raise CommandError("--runs must be at least 1")
        moved = jobs = 0
        for _ in range(runs):
            report = results_archive(batch=batch, batches=batches)
            moved, jobs = moved + report["moved"], jobs + report["jobs"]
            if not report["moved"]:
                break
        self.stdout.write(f"{moved} result(s) of {jobs} job(s) archived")
