from dadpo.cli import main

raise SystemExit(main())
