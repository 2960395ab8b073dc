from vfsnap.cli.main import main

raise SystemExit(main())
