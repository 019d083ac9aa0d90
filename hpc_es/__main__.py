from hpc_es.cli import main

raise SystemExit(main())
