from epmoe.cli import main

raise SystemExit(main())
