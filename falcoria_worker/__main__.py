from falcoria_worker.cli import main

raise SystemExit(main())
