from realizar.cli import main

raise SystemExit(main())
