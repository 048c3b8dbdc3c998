from dualflow.experiments.cli import main

raise SystemExit(main())
