"""Root of the test suite. Layers: tests/unit (no services), tests/integration (real Redis, RabbitMQ,
nmap, network namespaces; needs root), tests/system (systemd booted in nspawn), tests/reliability
(fault injection). Shared fixtures live in tests/support and tests/fakes and are loaded here once."""

pytest_plugins = [
    "tests.support.netns",
    "tests.support.services",
    "tests.fakes.scanledger",
    "tests.support.workerproc",
]
