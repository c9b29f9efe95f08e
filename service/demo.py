"""`make demo`: audit a simulated client's FedSGD update and print where the report is."""

from __future__ import annotations

from service.cli import app


def main() -> None:
    app(
        [
            "attack",
            "--arch",
            "convnet",
            "--images",
            "astronaut",
            "--labels",
            "1",
            "--labels-known",
            "--size",
            "32",
            "--time-limit",
            "45",
            "--iterations",
            "400",
            "--out",
            "runs",
        ]
    )


if __name__ == "__main__":
    main()
