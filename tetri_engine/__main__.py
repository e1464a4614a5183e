from tetri_engine.cli import main

raise SystemExit(main())
