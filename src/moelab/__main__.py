from moelab.cli import main

raise SystemExit(main())
