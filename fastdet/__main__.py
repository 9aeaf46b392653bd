from fastdet.cli import main

raise SystemExit(main())
