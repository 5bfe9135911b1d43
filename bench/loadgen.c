/*
 * mailgate bench load client: many scripted TCP or TLS 1.3 sessions at a
 * fixed concurrency from one epoll loop (one thread, non-blocking OpenSSL),
 * so the client spends as little CPU per session as a client can.
 *
 * Built at bench time by bench/loadgen.ts with the machine's cc and OpenSSL:
 *   cc -O2 -o loadgen loadgen.c -lssl -lcrypto
 *
 * A session runs a script (--script FILE), one step per line:
 *   S text     send text ("\r\n", "\\", "\t" escapes; "%U" becomes the user
 *              number of this session, 1..--users, zero-padded to 4 digits)
 *   F path     send the contents of a file
 *   E prefix   wait for a line that starts with prefix ("?" matches any
 *              character). A final line that does not match is an error:
 *              for "E 2?? " any "ddd " line, for "E a OK" any "a ..." line,
 *              for "E * OK" a "* BYE" line.
 *   R          repeat mark: after the last step, go back here (no new
 *              connection); each pass from R to the end is one operation
 *   H          hold: the connection stays open, idle, until the run ends
 * Without R or H, the end of the script ends the session: the socket is
 * closed and a new session starts in its slot.
 *
 * Counting starts after --warmup seconds and lasts --duration seconds; at the
 * window's start and end the CPU time (utime+stime, /proc/PID/stat) of every
 * process in each --cpu-pgid process group is read, so the proxy's CPU is
 * measured over exactly the window in which the sessions are counted.
 *
 * --hold: open --conc connections (at most --ramp in setup at once), run the
 * script up to H, print {"held":N,...} once all are held, then keep them
 * until stdin reaches EOF or --duration passes. With --hold-steps K it holds
 * conc/K, 2*conc/K, ... connections, printing a line at each step and going
 * on to the next when a line arrives on stdin.
 *
 * Output: one JSON object on stdout (sessions, ops, errors, bytes, latency
 * percentiles in microseconds, client CPU, negotiated TLS parameters).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum { ST_SEND = 'S', ST_FILE = 'F', ST_EXPECT = 'E', ST_REPEAT = 'R', ST_HOLD = 'H' };

typedef struct {
  char kind;
  char *data;
  size_t len;
  int has_user; /* text contains %U */
} step_t;

enum { C_FREE, C_CONNECTING, C_HANDSHAKE, C_RUN, C_HOLD };

#define LP_MAX 40

typedef struct {
  int fd;
  int state;
  SSL *ssl;
  int step;
  int user;
  double t_start;   /* session start (connect) */
  double t_op;      /* start of the current repeated operation */
  char *out;        /* pending output */
  size_t out_len, out_off, out_cap;
  char lp[LP_MAX];  /* the start of the line being received */
  int lp_len;
  int want_out;     /* EPOLLOUT registered */
  int lines_seen;   /* lines received in the current expect step */
  int restart;      /* closed: start a new session in this slot from the main loop */
} conn_t;

typedef struct {
  uint32_t *v;
  size_t n, cap;
} samples_t;

/* ---- options ---------------------------------------------------------- */

static const char *opt_host = "127.0.0.1";
static int opt_port = 0;
static int opt_tls = 0;
static int opt_conc = 1;
static double opt_duration = 3.0;
static double opt_warmup = 0.5;
static long opt_max_sessions = 0;
static const char *opt_script = NULL;
static int opt_users = 1;
static int opt_hold = 0;
static int opt_hold_steps = 1;
static int opt_ramp = 64;
static const char *opt_sni = NULL;
static const char *opt_ciphersuites = "TLS_AES_256_GCM_SHA384";
static const char *opt_groups = "X25519";
static int opt_resume = 0;
static int opt_nodelay = 1;
static const char *opt_cpu_pgids = NULL;

/* ---- state -------------------------------------------------------------- */

static step_t *steps;
static int nsteps;
static int repeat_at = -1;
static conn_t *conns;
static int epfd;
static SSL_CTX *ctx;
static struct sockaddr_in dest;
static double t0;
static int counting = 0;
static int stopping = 0;
static long sessions_started = 0;
static long user_counter = 0;

static long n_sessions, n_ops, n_errors, n_resumed, n_handshakes;
static unsigned long long bytes_in, bytes_out;
static samples_t lat_session, lat_op;
static char first_error[256];
static char tls_version[32], tls_cipher[64], tls_group[32];
static int held = 0;
static int in_setup = 0;

static SSL_SESSION *tickets[64];
static int nticket = 0;

#define MAX_PGIDS 8
static int pgids[MAX_PGIDS];
static int npgids = 0;
static unsigned long long cpu_start[MAX_PGIDS], cpu_end[MAX_PGIDS];
static struct rusage ru_start, ru_end;
static double window_start, window_end;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *msg) {
  fprintf(stderr, "loadgen: %s\n", msg);
  exit(2);
}

static void note_error(const char *what) {
  n_errors++;
  if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s", what);
}

static void sample_add(samples_t *s, double seconds) {
  if (s->n == s->cap) {
    s->cap = s->cap ? s->cap * 2 : 4096;
    s->v = realloc(s->v, s->cap * sizeof *s->v);
    if (!s->v) die("out of memory");
  }
  double us = seconds * 1e6;
  s->v[s->n++] = us > 4e9 ? 4000000000u : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static void print_samples(const char *name, samples_t *s) {
  printf("\"%s\":", name);
  if (s->n == 0) {
    printf("null");
    return;
  }
  qsort(s->v, s->n, sizeof *s->v, cmp_u32);
  double sum = 0;
  for (size_t i = 0; i < s->n; i++) sum += s->v[i];
#define PCT(p) s->v[(size_t)((p) / 100.0 * (s->n - 1) + 0.5)]
  printf("{\"n\":%zu,\"mean\":%.1f,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"max\":%u}", s->n, sum / s->n, PCT(50), PCT(90), PCT(99), s->v[s->n - 1]);
#undef PCT
}

/* ---- /proc CPU of process groups -------------------------------------- */

static unsigned long long group_cpu_ticks(int pgid) {
  unsigned long long total = 0;
  DIR *d = opendir("/proc");
  if (!d) return 0;
  struct dirent *e;
  char path[300], buf[1024];
  while ((e = readdir(d))) {
    if (!isdigit((unsigned char)e->d_name[0])) continue;
    snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
    int fd = open(path, O_RDONLY);
    if (fd < 0) continue;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) continue;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) continue;
    /* after ") ": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime;
       cutime/cstime: children this process reaped (Postfix's or Dovecot's short-lived workers) */
    char state;
    int ppid, pgrp;
    unsigned long long utime, stime, cutime, cstime;
    if (sscanf(p + 2, "%c %d %d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %llu %llu", &state, &ppid, &pgrp, &utime, &stime, &cutime, &cstime) != 7) continue;
    if (pgrp == pgid) total += utime + stime + cutime + cstime;
  }
  closedir(d);
  return total;
}

static void sample_cpu(unsigned long long *out) {
  for (int i = 0; i < npgids; i++) out[i] = group_cpu_ticks(pgids[i]);
}

/* ---- script -------------------------------------------------------------- */

static char *unescape(const char *s, size_t *len) {
  size_t n = strlen(s);
  char *o = malloc(n + 1);
  size_t j = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '\\' && i + 1 < n) {
      char c = s[++i];
      o[j++] = c == 'r' ? '\r' : c == 'n' ? '\n' : c == 't' ? '\t' : c == '0' ? '\0' : c;
    } else {
      o[j++] = s[i];
    }
  }
  o[j] = 0;
  *len = j;
  return o;
}

static void load_script(const char *file) {
  FILE *f = fopen(file, "r");
  if (!f) die("cannot open script");
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  int cap_steps = 16;
  steps = calloc(cap_steps, sizeof *steps);
  while ((n = getline(&line, &cap, f)) > 0) {
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
    if (n == 0 || line[0] == '#') continue;
    if (nsteps == cap_steps) steps = realloc(steps, (cap_steps *= 2) * sizeof *steps);
    step_t *st = &steps[nsteps];
    memset(st, 0, sizeof *st);
    st->kind = line[0];
    const char *arg = n > 2 ? line + 2 : "";
    switch (st->kind) {
      case ST_SEND:
      case ST_EXPECT:
        st->data = unescape(arg, &st->len);
        st->has_user = st->kind == ST_SEND && strstr(st->data, "%U") != NULL;
        break;
      case ST_FILE: {
        FILE *g = fopen(arg, "rb");
        if (!g) die("cannot open a file named in the script");
        fseek(g, 0, SEEK_END);
        long sz = ftell(g);
        fseek(g, 0, SEEK_SET);
        st->data = malloc(sz > 0 ? sz : 1);
        st->len = fread(st->data, 1, sz, g);
        fclose(g);
        st->kind = ST_SEND;
        break;
      }
      case ST_REPEAT:
        repeat_at = nsteps;
        break;
      case ST_HOLD:
        break;
      default:
        die("unknown script step");
    }
    nsteps++;
  }
  free(line);
  fclose(f);
}

/* ---- connections ------------------------------------------------------------ */

static void set_interest(conn_t *c, int out) {
  if (c->want_out == out) return;
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
  c->want_out = out;
}

static void start_conn(conn_t *c);
static void restart_slots(int limit);

static void close_conn(conn_t *c, int restart) {
  if (c->ssl) {
    if (opt_resume && c->state >= C_RUN) SSL_shutdown(c->ssl); /* a session that is not shut down is not resumable */
    SSL_free(c->ssl);
    c->ssl = NULL;
  }
  if (c->fd >= 0) close(c->fd);
  if (c->state == C_HOLD) held--;
  c->fd = -1;
  c->state = C_FREE;
  c->out_len = c->out_off = 0;
  c->restart = restart && !stopping;
}

/* Slots whose session ended get a new one (not from inside an event handler, so failures cannot recurse). */
static void restart_slots(int limit) {
  int started = 0;
  for (int i = 0; i < opt_conc && started < limit; i++) {
    if (conns[i].state == C_FREE && conns[i].restart) {
      conns[i].restart = 0;
      start_conn(&conns[i]);
      started++;
    }
  }
}

static void fail(conn_t *c, const char *why) {
  char msg[200];
  unsigned long e = ERR_get_error();
  if (e) {
    char es[120];
    ERR_error_string_n(e, es, sizeof es);
    snprintf(msg, sizeof msg, "%s (%s)", why, es);
    ERR_clear_error();
  } else if (errno) {
    snprintf(msg, sizeof msg, "%s (%s)", why, strerror(errno));
  } else {
    snprintf(msg, sizeof msg, "%s", why);
  }
  if (counting || in_setup) note_error(msg);
  close_conn(c, 1);
}

static int new_session_cb(SSL *ssl, SSL_SESSION *sess) {
  (void)ssl;
  if (nticket == (int)(sizeof tickets / sizeof tickets[0])) {
    SSL_SESSION_free(tickets[0]);
    memmove(tickets, tickets + 1, (nticket - 1) * sizeof tickets[0]);
    nticket--;
  }
  tickets[nticket++] = sess;
  return 1; /* we keep the reference */
}

static void start_conn(conn_t *c) {
  if (opt_max_sessions > 0 && sessions_started >= opt_max_sessions) return;
  sessions_started++;
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die("socket() failed (file descriptor limit?)");
  if (opt_nodelay) {
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  c->t_start = now();
  c->step = 0;
  c->lp_len = 0;
  c->lines_seen = 0;
  c->user = (int)(user_counter++ % opt_users) + 1;
  c->out_len = c->out_off = 0;
  c->want_out = 1;
  c->state = C_CONNECTING;
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
  if (connect(c->fd, (struct sockaddr *)&dest, sizeof dest) < 0 && errno != EINPROGRESS) {
    fail(c, "connect");
  }
}

static void out_append(conn_t *c, const char *data, size_t len, int user) {
  size_t need = c->out_len + len + 8;
  if (need > c->out_cap) {
    c->out_cap = need * 2;
    c->out = realloc(c->out, c->out_cap);
    if (!c->out) die("out of memory");
  }
  if (!user) {
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    return;
  }
  for (size_t i = 0; i < len; i++) {
    if (data[i] == '%' && i + 1 < len && data[i + 1] == 'U') {
      c->out_len += sprintf(c->out + c->out_len, "%04d", c->user % 10000);
      i++;
    } else {
      c->out[c->out_len++] = data[i];
    }
  }
}

/* Returns 0 when everything is written, 1 when it must wait for EPOLLOUT, -1 on error. */
static int flush_out(conn_t *c) {
  while (c->out_off < c->out_len) {
    size_t rest = c->out_len - c->out_off;
    if (c->ssl) {
      int n = SSL_write(c->ssl, c->out + c->out_off, rest > INT32_MAX ? INT32_MAX : (int)rest);
      if (n <= 0) {
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) return 1;
        return -1;
      }
      c->out_off += n;
      if (counting) bytes_out += n;
    } else {
      ssize_t n = send(c->fd, c->out + c->out_off, rest, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
        return -1;
      }
      c->out_off += n;
      if (counting) bytes_out += n;
    }
  }
  c->out_off = c->out_len = 0;
  return 0;
}

static void session_done(conn_t *c) {
  if (counting) {
    n_sessions++;
    sample_add(&lat_session, now() - c->t_start);
  }
  close_conn(c, 1);
}

/* Runs send steps until an expect (or the end). Returns -1 when the connection was closed. */
static int advance(conn_t *c) {
  for (;;) {
    if (c->step >= nsteps) {
      if (repeat_at >= 0) {
        if (counting) {
          n_ops++;
          sample_add(&lat_op, now() - c->t_op);
        }
        c->step = repeat_at;
        continue;
      }
      session_done(c);
      return -1;
    }
    step_t *st = &steps[c->step];
    if (st->kind == ST_SEND) {
      out_append(c, st->data, st->len, st->has_user);
      c->step++;
      continue;
    }
    if (st->kind == ST_REPEAT) {
      c->t_op = now();
      c->step++;
      continue;
    }
    if (st->kind == ST_HOLD) {
      if (c->state != C_HOLD) {
        c->state = C_HOLD;
        held++;
      }
    }
    break; /* expect or hold */
  }
  int r = flush_out(c);
  if (r < 0) {
    fail(c, "write");
    return -1;
  }
  set_interest(c, r == 1);
  return 0;
}

static int wild_prefix(const char *line, int len, const char *p, size_t plen) {
  if ((size_t)len < plen) return 0;
  for (size_t i = 0; i < plen; i++)
    if (p[i] != '?' && p[i] != line[i]) return 0;
  return 1;
}

/* A complete line (its first LP_MAX bytes) arrived. Returns -1 when the connection was closed. */
static int on_line(conn_t *c) {
  if (c->state != C_RUN || c->step >= nsteps) return 0;
  step_t *st = &steps[c->step];
  if (st->kind != ST_EXPECT) return 0;
  const char *l = c->lp;
  int n = c->lp_len;
  c->lines_seen++;
  if (wild_prefix(l, n, st->data, st->len)) {
    c->step++;
    c->lines_seen = 0;
    return advance(c);
  }
  int final = 0;
  char first = st->data[0];
  if (isdigit((unsigned char)first) || first == '?') {
    final = n >= 4 && isdigit((unsigned char)l[0]) && isdigit((unsigned char)l[1]) && isdigit((unsigned char)l[2]) && l[3] == ' ';
  } else if (first == '*') {
    final = n >= 5 && memcmp(l, "* BYE", 5) == 0;
  } else {
    const char *sp = memchr(st->data, ' ', st->len);
    size_t tl = sp ? (size_t)(sp - st->data) + 1 : st->len;
    final = (size_t)n >= tl && memcmp(l, st->data, tl) == 0;
  }
  if (final) {
    char why[120];
    snprintf(why, sizeof why, "unexpected reply: %.*s", n > 60 ? 60 : n, l);
    errno = 0;
    fail(c, why);
    return -1;
  }
  return 0;
}

static int on_bytes(conn_t *c, const char *buf, size_t n) {
  const char *p = buf, *end = buf + n;
  while (p < end) {
    const char *nl = memchr(p, '\n', end - p);
    const char *stop = nl ? nl : end;
    size_t take = stop - p;
    if (c->lp_len < LP_MAX) {
      size_t room = LP_MAX - c->lp_len;
      if (take > room) take = room;
      memcpy(c->lp + c->lp_len, p, take);
      c->lp_len += take;
    }
    if (!nl) break;
    if (on_line(c) < 0) return -1;
    c->lp_len = 0;
    p = nl + 1;
  }
  return 0;
}

static void note_tls(conn_t *c) {
  n_handshakes++;
  if (SSL_session_reused(c->ssl)) n_resumed++;
  if (!tls_version[0]) {
    snprintf(tls_version, sizeof tls_version, "%s", SSL_get_version(c->ssl));
    snprintf(tls_cipher, sizeof tls_cipher, "%s", SSL_get_cipher_name(c->ssl));
    int nid = SSL_get_negotiated_group(c->ssl);
    const char *g = nid ? OBJ_nid2sn(nid) : "?";
    snprintf(tls_group, sizeof tls_group, "%s", g ? g : "?");
  }
}

static void on_event(conn_t *c, uint32_t events) {
  static char buf[1 << 16];
  if (c->state == C_FREE) return;
  if (c->state == C_CONNECTING) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      errno = err;
      fail(c, "connect");
      return;
    }
    if (!(events & (EPOLLOUT | EPOLLIN))) return;
    if (opt_tls) {
      c->ssl = SSL_new(ctx);
      SSL_set_fd(c->ssl, c->fd);
      SSL_set_connect_state(c->ssl);
      if (opt_sni) SSL_set_tlsext_host_name(c->ssl, opt_sni);
      if (opt_resume && nticket > 0) {
        /* like a client's session cache: the newest ticket, reused until a newer one arrives (a copy
           per connection, so that one connection's ending cannot mark the cached one unresumable) */
        SSL_SESSION *copy = SSL_SESSION_dup(tickets[nticket - 1]);
        if (copy) {
          SSL_set_session(c->ssl, copy);
          SSL_SESSION_free(copy);
        }
      }
      c->state = C_HANDSHAKE;
    } else {
      c->state = C_RUN;
      if (advance(c) < 0) return;
      return;
    }
  }
  if (c->state == C_HANDSHAKE) {
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
      note_tls(c);
      c->state = C_RUN;
      if (advance(c) < 0) return;
    } else {
      int e = SSL_get_error(c->ssl, r);
      if (e == SSL_ERROR_WANT_READ) set_interest(c, 0);
      else if (e == SSL_ERROR_WANT_WRITE) set_interest(c, 1);
      else {
        errno = 0;
        fail(c, "TLS handshake");
      }
      return;
    }
  }
  if ((events & EPOLLOUT) && c->out_off < c->out_len) {
    int r = flush_out(c);
    if (r < 0) {
      fail(c, "write");
      return;
    }
    set_interest(c, r == 1);
  } else if ((events & EPOLLOUT) && c->out_off >= c->out_len) {
    set_interest(c, 0);
  }
  /* read everything there is (TLS may hold decrypted bytes the socket no longer shows) */
  for (;;) {
    if (c->state == C_FREE) return;
    ssize_t n;
    if (c->ssl) {
      ERR_clear_error();
      int r = SSL_read(c->ssl, buf, sizeof buf);
      if (r <= 0) {
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) return;
        if (e == SSL_ERROR_WANT_WRITE) {
          set_interest(c, 1);
          return;
        }
        if (c->state == C_HOLD && stopping) return;
        errno = 0;
        fail(c, e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL ? "connection closed by the server" : "TLS read");
        return;
      }
      n = r;
    } else {
      n = recv(c->fd, buf, sizeof buf, 0);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        fail(c, "read");
        return;
      }
      if (n == 0) {
        errno = 0;
        fail(c, "connection closed by the server");
        return;
      }
    }
    if (counting) bytes_in += n;
    if (c->state == C_HOLD) continue;
    if (on_bytes(c, buf, n) < 0) return;
  }
}

/* ---- main ---------------------------------------------------------------------- */

static void usage(void) {
  fprintf(stderr,
          "usage: loadgen --port N --script FILE [--host IP] [--tls] [--sni NAME] [--conc N] [--duration S]\n"
          "               [--warmup S] [--max-sessions N] [--users N] [--hold [--hold-steps K]] [--ramp N] [--resume]\n"
          "               [--ciphersuites LIST] [--groups LIST] [--no-nodelay] [--cpu-pgid PGID[,PGID...]]\n");
  exit(2);
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
#define ARG() (i + 1 < argc ? argv[++i] : (usage(), ""))
    if (!strcmp(a, "--host")) opt_host = ARG();
    else if (!strcmp(a, "--port")) opt_port = atoi(ARG());
    else if (!strcmp(a, "--tls")) opt_tls = 1;
    else if (!strcmp(a, "--sni")) opt_sni = ARG();
    else if (!strcmp(a, "--conc")) opt_conc = atoi(ARG());
    else if (!strcmp(a, "--duration")) opt_duration = atof(ARG());
    else if (!strcmp(a, "--warmup")) opt_warmup = atof(ARG());
    else if (!strcmp(a, "--max-sessions")) opt_max_sessions = atol(ARG());
    else if (!strcmp(a, "--script")) opt_script = ARG();
    else if (!strcmp(a, "--users")) opt_users = atoi(ARG());
    else if (!strcmp(a, "--hold")) opt_hold = 1;
    else if (!strcmp(a, "--hold-steps")) opt_hold_steps = atoi(ARG());
    else if (!strcmp(a, "--ramp")) opt_ramp = atoi(ARG());
    else if (!strcmp(a, "--resume")) opt_resume = 1;
    else if (!strcmp(a, "--ciphersuites")) opt_ciphersuites = ARG();
    else if (!strcmp(a, "--groups")) opt_groups = ARG();
    else if (!strcmp(a, "--no-nodelay")) opt_nodelay = 0;
    else if (!strcmp(a, "--cpu-pgid")) opt_cpu_pgids = ARG();
    else usage();
#undef ARG
  }
  if (!opt_port || !opt_script || opt_conc < 1 || opt_users < 1) usage();
  signal(SIGPIPE, SIG_IGN);
  struct rlimit rl = {.rlim_cur = 65536, .rlim_max = 65536};
  if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (opt_cpu_pgids) {
    char *copy = strdup(opt_cpu_pgids), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && npgids < MAX_PGIDS; t = strtok_r(NULL, ",", &save)) pgids[npgids++] = atoi(t);
    free(copy);
  }
  load_script(opt_script);

  memset(&dest, 0, sizeof dest);
  dest.sin_family = AF_INET;
  dest.sin_port = htons(opt_port);
  if (inet_pton(AF_INET, opt_host, &dest.sin_addr) != 1) die("--host must be an IPv4 address");

  if (opt_tls) {
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (!SSL_CTX_set_ciphersuites(ctx, opt_ciphersuites)) die("bad --ciphersuites");
    if (!SSL_CTX_set1_groups_list(ctx, opt_groups)) die("bad --groups");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (opt_resume) {
      SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
      SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
    } else {
      SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
  }

  epfd = epoll_create1(EPOLL_CLOEXEC);
  conns = calloc(opt_conc, sizeof *conns);
  for (int i = 0; i < opt_conc; i++) conns[i].fd = -1;

  t0 = now();
  if (opt_hold) {
    /* Open connections in waves of --ramp until conc*step/steps are held; report; wait for a line on
       stdin to go on to the next step (EOF or --duration ends the run). */
    struct epoll_event evs[256];
    struct epoll_event ev0 = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev0);
    int opened = 0, quit = 0;
    for (int stepi = 1; stepi <= opt_hold_steps && !quit; stepi++) {
      int goal = (int)((long)opt_conc * stepi / opt_hold_steps);
      double t_step = now(), deadline = t_step + 120;
      in_setup = 1;
      stopping = 0;
      while (held < goal && !quit) {
        int active = 0;
        for (int i = 0; i < opened; i++)
          if (conns[i].state != C_FREE && conns[i].state != C_HOLD) active++;
        if (active < opt_ramp) restart_slots(opt_ramp - active);
        active = 0;
        for (int i = 0; i < opened; i++)
          if (conns[i].state != C_FREE && conns[i].state != C_HOLD) active++;
        while (opened < goal && active < opt_ramp) {
          start_conn(&conns[opened++]);
          active++;
        }
        int n = epoll_wait(epfd, evs, 256, 100);
        for (int k = 0; k < n; k++) {
          if (evs[k].data.ptr == NULL) {
            char b[64];
            if (read(0, b, sizeof b) <= 0) quit = 1;
          } else {
            on_event(evs[k].data.ptr, evs[k].events);
          }
        }
        if (now() > deadline || n_errors > opt_conc / 10 + 10) break;
      }
      in_setup = 0;
      stopping = 1;
      printf("{\"held\":%d,\"goal\":%d,\"errors\":%ld,\"setup_s\":%.3f,\"first_error\":\"%s\"}\n", held, goal, n_errors, now() - t_step, first_error);
      fflush(stdout);
      if (held < goal) return 1;
      double until = now() + opt_duration;
      int next = 0;
      while (!next && !quit) {
        int n = epoll_wait(epfd, evs, 256, 200);
        for (int k = 0; k < n; k++) {
          if (evs[k].data.ptr == NULL) {
            char b[64];
            if (read(0, b, sizeof b) <= 0) quit = 1;
            else next = 1;
          } else {
            on_event(evs[k].data.ptr, evs[k].events);
          }
        }
        if (now() > until) quit = 1;
      }
    }
    for (int i = 0; i < opt_conc; i++)
      if (conns[i].state != C_FREE) close_conn(&conns[i], 0);
    return 0;
  }

  for (int i = 0; i < opt_conc; i++) start_conn(&conns[i]);
  struct epoll_event evs[256];
  double win_start = t0 + opt_warmup, win_end = win_start + opt_duration;
  if (opt_warmup <= 0) {
    counting = 1;
    getrusage(RUSAGE_SELF, &ru_start);
    sample_cpu(cpu_start);
    window_start = now();
  }
  for (;;) {
    double t = now();
    if (!counting && t >= win_start) {
      counting = 1;
      getrusage(RUSAGE_SELF, &ru_start);
      sample_cpu(cpu_start);
      window_start = now();
    }
    if (t >= win_end) break;
    if (opt_max_sessions > 0 && sessions_started >= opt_max_sessions) {
      int live = 0;
      for (int i = 0; i < opt_conc; i++)
        if (conns[i].state != C_FREE) live++;
      if (!live) break;
    }
    double wait = (counting ? win_end : win_start) - t;
    int ms = (int)(wait * 1000) + 1;
    if (ms > 50) ms = 50;
    int n = epoll_wait(epfd, evs, 256, ms);
    for (int k = 0; k < n; k++) on_event(evs[k].data.ptr, evs[k].events);
    restart_slots(opt_conc);
  }
  window_end = now();
  sample_cpu(cpu_end);
  getrusage(RUSAGE_SELF, &ru_end);
  stopping = 1;
  double elapsed = window_end - window_start;
  double ucpu = (ru_end.ru_utime.tv_sec - ru_start.ru_utime.tv_sec) + (ru_end.ru_utime.tv_usec - ru_start.ru_utime.tv_usec) / 1e6;
  double scpu = (ru_end.ru_stime.tv_sec - ru_start.ru_stime.tv_sec) + (ru_end.ru_stime.tv_usec - ru_start.ru_stime.tv_usec) / 1e6;
  long tck = sysconf(_SC_CLK_TCK);

  printf("{\"elapsed\":%.6f,\"sessions\":%ld,\"ops\":%ld,\"errors\":%ld,\"handshakes\":%ld,\"resumed\":%ld,", elapsed, n_sessions, n_ops, n_errors, n_handshakes,
         n_resumed);
  printf("\"bytes_in\":%llu,\"bytes_out\":%llu,\"client_cpu_s\":%.4f,", bytes_in, bytes_out, ucpu + scpu);
  printf("\"cpu_s\":[");
  for (int i = 0; i < npgids; i++) printf("%s%.4f", i ? "," : "", ((double)cpu_end[i] - (double)cpu_start[i]) / tck);
  printf("],\"tls\":{\"version\":\"%s\",\"cipher\":\"%s\",\"group\":\"%s\"},", tls_version, tls_cipher, tls_group);
  print_samples("lat_session_us", &lat_session);
  printf(",");
  print_samples("lat_op_us", &lat_op);
  printf(",\"first_error\":\"");
  for (const char *p = first_error; *p; p++) {
    if (*p == '"' || *p == '\\') putchar('\\');
    putchar((unsigned char)*p < 0x20 ? ' ' : *p);
  }
  printf("\"}\n");
  for (int i = 0; i < opt_conc; i++)
    if (conns[i].state != C_FREE) close_conn(&conns[i], 0);
  return 0;
}
