from sar_scale.cli import main

raise SystemExit(main())
