"""``stages build -t NAME [-f Containerfile] [--target STAGE] [--network MODE] [--pids-limit N] [--memory M]
CONTEXT``: a Containerfile made into an image, with a cache."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-t", "--tag", required=True, metavar="NAME[:TAG]", help="the name of the image")
    parser.add_argument("-f", "--file", metavar="FILE",
                        help="the Containerfile (default: CONTEXT/Containerfile, else CONTEXT/Dockerfile)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a value for an ARG of the Containerfile (repeatable)")
    parser.add_argument("--target", metavar="STAGE",
                        help="build up to the stage named STAGE (FROM IMAGE AS STAGE); default: the last")
    parser.add_argument("--network", default="none", metavar="MODE",
                        help="the network of RUN steps: none (default: offline), bridge (outbound through "
                             "NAT), host")
    parser.add_argument("--pids-limit", metavar="N",
                        help="how many processes each RUN may have at once (its cgroup's pids.max; "
                             "default 2048, podman's)")
    parser.add_argument("--memory", metavar="SIZE",
                        help="how much memory each RUN may use, e.g. 512M or 2G (default: half of this "
                             "machine's RAM); more and the kernel kills it")
    parser.add_argument("context", metavar="CONTEXT", help="the directory whose files COPY and ADD see")


def run(args) -> int:
    from stages.errors import StagesError
    from stages.runtime import build

    values = {}
    for item in args.build_arg:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise StagesError(f"--build-arg {item!r} is not NAME=VALUE", "write --build-arg VERSION=1.2")
        values[name] = value
    build.build(args.context, args.tag, args.file, values, out=lambda line: print(line, flush=True),
                target=args.target, network=args.network, pids_limit=args.pids_limit, memory=args.memory)
    return 0
