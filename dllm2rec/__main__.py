from dllm2rec.cli import main

raise SystemExit(main())
