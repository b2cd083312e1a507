/* stages-init: the container's PID 1 when its command is not an init (like tini or docker-init).
 *
 * PID 1 of a PID namespace has two duties no ordinary program does (pid_namespaces(7)): orphans are
 * re-parented to it, so it must reap them or they stay zombies; and the kernel delivers to it only the
 * signals it has a handler for, so a plain `sleep` as PID 1 never sees `stages stop`'s SIGTERM.
 * This program forks the command, forwards the catchable signals to it, reaps every child, and exits
 * the way the command did (its status, or 128 + the signal that killed it, as a shell reports it).
 * It is built static, bind-mounted read-only into the container, and runs after pivot_root, where the
 * host's Python is out of reach: that is why it is C. Usage: stages-init -- COMMAND [ARG...]
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT};

int main(int argc, char **argv) {
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "--") == 0) first = 2;
    if (first >= argc) {
        fprintf(stderr, "stages-init: usage: stages-init -- COMMAND [ARG...]\n");
        return 2;
    }
    sigset_t all, previous;
    sigfillset(&all);
    /* Block the signals now and take them with sigwait(): no handler races with fork or waitpid. */
    sigprocmask(SIG_BLOCK, &all, &previous);
    pid_t child = fork();
    if (child < 0) {
        perror("stages-init: fork");
        return 1;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &previous, NULL);
        execvp(argv[first], argv + first);
        fprintf(stderr, "stages-init: cannot run %s: %s\n", argv[first], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    for (;;) {
        int status;
        pid_t done;
        /* Reap everything that has ended: the command, and any orphan re-parented to us. */
        while ((done = waitpid(-1, &status, WNOHANG)) > 0) {
            if (done == child) {
                if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
                return WEXITSTATUS(status);
            }
        }
        if (done < 0 && errno == ECHILD) return 1;
        int number;
        if (sigwait(&all, &number) != 0) continue;
        if (number == SIGCHLD) continue;
        for (unsigned i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) {
            if (forwarded[i] == number) {
                kill(child, number);
                break;
            }
        }
    }
}
