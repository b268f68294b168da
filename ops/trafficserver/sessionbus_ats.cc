/*
 * sessionbus_ats: makes a Traffic Server 9.2 instance a member of a sessionbus farm.
 *
 * Only what must run inside ATS is here; sealing, the bus and metrics are the local
 * `sessionbus cache` (docs/servers/traffic-server.md).
 *
 *   NEW     TS_SSL_SESSION_HOOK NEW -> TSSslSessionGetBuffer -> a bounded queue -> a sender thread
 *           -> `set mod_ssl-sess:<hex id>` on the cache's memcached listener. A handshake never
 *           waits: when the queue is full the session is dropped and counted.
 *   REMOVE  as a sessionbus node does: ATS's remove callback only marks the id (OpenSSL also
 *           calls it for every connection freed without close_notify, a plain TCP drop); a
 *           marked session whose connection saw a fatal TLS alert (sent or received, seen by a
 *           per-connection message callback) travels as `delete`.
 *   peers   a push thread subscribes to the cache's push listener (servers/cache/push.py),
 *           gets the replica's live sessions then every peer NEW/REMOVE, and applies them with
 *           TSSslSessionInsert / TSSslSessionRemove.
 *   keys    a watcher thread loads the ticket key file `sessionbus keyfile --format ats` keeps
 *           with TSSslTicketKeyUpdate the moment it changes: no config reload.
 *   context every connection gets the service's session id context (SSL_set_session_id_context),
 *           so every ATS instance and every `sessionbus node --service NAME` share sessions
 *           whatever their certificate paths.
 *
 * plugin.config:
 *   sessionbus_ats.so --cache 127.0.0.1:11211 --push 127.0.0.1:11213 --context NAME \
 *                     [--ticket-keys /var/lib/sessionbus/keyfiles/ats/ssl_ticket.key] [--queue N]
 *
 * Logs go through ATS's diags (tag "sessionbus"); they never hold key or session bytes.
 */

#include <ts/ts.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <poll.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

namespace
{
const char *TAG   = "sessionbus";
const char *PNAME = "sessionbus_ats";

struct Endpoint {
  std::string host;
  int port = 0;
};

struct Config {
  Endpoint cache;
  Endpoint push;
  std::string context;
  std::string ticket_keys;
  size_t queue_max = 10000;
};

Config cfg;

// Statistics (traffic_ctl metric get plugin.sessionbus.*): counts only.
int st_new_queued, st_new_dropped, st_removes_sent, st_inserted, st_removed, st_keys_loaded,
  st_cache_up, st_push_up;

// A session NEW or REMOVE on its way to the cache.
struct Outgoing {
  bool remove;
  std::string id;
  std::string der;
};

std::mutex q_mutex;
std::condition_variable q_cv;
std::deque<Outgoing> queue;

// Ids ATS's remove callback reported, waiting to see how their connection ends (bounded).
std::mutex marks_mutex;
std::unordered_set<std::string> marks;
std::deque<std::string> marks_order;
const size_t MARKS_MAX = 10000;

// ex_data slot: set on a connection that sent or received a fatal alert.
int fatal_idx = -1;

// Set while this thread applies a pushed session: ATS's own hooks must not echo it back.
thread_local bool applying = false;

bool
parse_endpoint(const char *s, Endpoint &ep)
{
  std::string v(s);
  auto colon = v.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return false;
  }
  ep.host = v.substr(0, colon);
  ep.port = atoi(v.c_str() + colon + 1);
  return ep.port > 0 && ep.port < 65536;
}

int
connect_to(const Endpoint &ep)
{
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return -1;
  }
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port   = htons(ep.port);
  if (inet_pton(AF_INET, ep.host.c_str(), &sa.sin_addr) != 1 ||
      connect(fd, reinterpret_cast<sockaddr *>(&sa), sizeof(sa)) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return fd;
}

bool
write_all(int fd, const char *p, size_t n)
{
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) {
      continue;
    }
    if (w <= 0) {
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

std::string
hex(const std::string &b)
{
  static const char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(b.size() * 2);
  for (unsigned char c : b) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

void
enqueue(Outgoing &&o)
{
  {
    std::lock_guard<std::mutex> g(q_mutex);
    if (queue.size() >= cfg.queue_max) {
      TSStatIntIncrement(st_new_dropped, 1);
      return;
    }
    queue.push_back(std::move(o));
  }
  TSStatIntIncrement(st_new_queued, 1);
  q_cv.notify_one();
}

// Drain the queue to the cache's memcached listener (noreply: nothing to read back). A failed
// write keeps the item and reconnects after a backoff; the queue bound protects ATS meanwhile.
void *
sender_thread(void *)
{
  int fd          = -1;
  int backoff_ms  = 100;
  bool warned     = false;
  for (;;) {
    Outgoing o;
    {
      std::unique_lock<std::mutex> lk(q_mutex);
      q_cv.wait(lk, [] { return !queue.empty(); });
      o = queue.front();
    }
    if (fd < 0) {
      fd = connect_to(cfg.cache);
      if (fd < 0) {
        if (!warned) {
          TSError("[%s] cannot reach the sessionbus cache at %s:%d; sessions wait (bounded) and "
                  "ATS resumes from its own cache", PNAME, cfg.cache.host.c_str(), cfg.cache.port);
          warned = true;
        }
        TSStatIntSet(st_cache_up, 0);
        std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
        backoff_ms = std::min(backoff_ms * 2, 5000);
        continue;
      }
      TSNote("[%s] connected to the sessionbus cache at %s:%d", PNAME, cfg.cache.host.c_str(),
             cfg.cache.port);
      TSStatIntSet(st_cache_up, 1);
      warned     = false;
      backoff_ms = 100;
    }
    std::string key = "mod_ssl-sess:" + hex(o.id);
    std::string msg;
    if (o.remove) {
      msg = "delete " + key + " noreply\r\n";
    } else {
      msg = "set " + key + " 0 0 " + std::to_string(o.der.size()) + " noreply\r\n";
      msg += o.der;
      msg += "\r\n";
    }
    if (!write_all(fd, msg.data(), msg.size())) {
      close(fd);
      fd = -1;
      TSStatIntSet(st_cache_up, 0);
      TSError("[%s] lost the sessionbus cache connection; reconnecting", PNAME);
      continue;  // the item stays queued
    }
    if (o.remove) {
      TSStatIntIncrement(st_removes_sent, 1);
    }
    std::lock_guard<std::mutex> g(q_mutex);
    queue.pop_front();
  }
  return nullptr;
}

bool
read_exact(int fd, char *p, size_t n)
{
  while (n > 0) {
    ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r <= 0) {
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void
apply_new(const char *p, uint32_t n)
{
  if (n < 1) {
    return;
  }
  unsigned id_len = static_cast<unsigned char>(p[0]);
  if (id_len == 0 || id_len > TS_SSL_MAX_SSL_SESSION_ID_LENGTH || n < 1 + id_len + 8) {
    return;
  }
  TSSslSessionID sid;
  sid.len = id_len;
  memcpy(sid.bytes, p + 1, id_len);
  const unsigned char *der = reinterpret_cast<const unsigned char *>(p + 1 + id_len + 8);
  long der_len             = static_cast<long>(n - 1 - id_len - 8);
  SSL_SESSION *sess        = d2i_SSL_SESSION(nullptr, &der, der_len);
  if (sess == nullptr) {
    TSDebug(TAG, "a pushed session did not parse; skipped");
    return;
  }
  unsigned int embedded_len = 0;
  const unsigned char *embedded = SSL_SESSION_get_id(sess, &embedded_len);
  if (embedded_len == id_len && memcmp(embedded, sid.bytes, id_len) == 0) {
    applying = true;
    if (TSSslSessionInsert(&sid, reinterpret_cast<TSSslSession>(sess), nullptr) == TS_SUCCESS) {
      TSStatIntIncrement(st_inserted, 1);
    }
    applying = false;
  }
  SSL_SESSION_free(sess);  // ATS keeps its own serialized copy
}

void
apply_remove(const char *p, uint32_t n)
{
  if (n == 0 || n > TS_SSL_MAX_SSL_SESSION_ID_LENGTH) {
    return;
  }
  TSSslSessionID sid;
  sid.len = n;
  memcpy(sid.bytes, p, n);
  applying = true;
  TSSslSessionRemove(&sid);
  applying = false;
  TSStatIntIncrement(st_removed, 1);
}

// Subscribe to the cache's push listener and apply what it sends; reconnect (and so replay)
// after any failure. A TSThreadCreate thread: ATS's session cache API may be called from it.
void *
push_thread(void *)
{
  int backoff_ms = 100;
  bool warned    = false;
  std::vector<char> buf;
  for (;;) {
    int fd = connect_to(cfg.push);
    if (fd < 0) {
      if (!warned) {
        TSError("[%s] cannot reach the sessionbus cache push listener at %s:%d; retrying",
                PNAME, cfg.push.host.c_str(), cfg.push.port);
        warned = true;
      }
      TSStatIntSet(st_push_up, 0);
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
      backoff_ms = std::min(backoff_ms * 2, 5000);
      continue;
    }
    timeval none{0, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
    std::string sub;
    sub += 'S';
    uint32_t len = htonl(static_cast<uint32_t>(cfg.context.size()));
    sub.append(reinterpret_cast<const char *>(&len), 4);
    sub += cfg.context;
    if (!write_all(fd, sub.data(), sub.size())) {
      close(fd);
      continue;
    }
    TSStatIntSet(st_push_up, 1);
    warned         = false;
    backoff_ms     = 100;
    uint64_t count = 0;
    for (;;) {
      char hdr[5];
      if (!read_exact(fd, hdr, 5)) {
        break;
      }
      uint32_t n;
      memcpy(&n, hdr + 1, 4);
      n = ntohl(n);
      if (n > 1u << 20) {
        TSError("[%s] push: a frame of %u bytes; reconnecting", PNAME, n);
        break;
      }
      buf.resize(n);
      if (n && !read_exact(fd, buf.data(), n)) {
        break;
      }
      switch (hdr[0]) {
      case 'N':
        apply_new(buf.data(), n);
        ++count;
        break;
      case 'R':
        apply_remove(buf.data(), n);
        break;
      case 'E':
        TSNote("[%s] subscribed to the sessionbus cache: %llu session(s) replayed", PNAME,
               static_cast<unsigned long long>(count));
        break;
      default:
        break;  // unknown frames are skipped: newer fronts may send more
      }
    }
    close(fd);
    TSStatIntSet(st_push_up, 0);
    TSError("[%s] push subscription lost; resubscribing", PNAME);
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
  }
  return nullptr;
}

// Load the ticket key file whenever it changes (mtime, size or inode), with no reload.
void *
keys_thread(void *)
{
  struct stat last {};
  std::string last_data;
  bool warned = false;
  for (;;) {
    struct stat st {};
    if (stat(cfg.ticket_keys.c_str(), &st) == 0) {
      if (st.st_mtim.tv_sec != last.st_mtim.tv_sec || st.st_mtim.tv_nsec != last.st_mtim.tv_nsec ||
          st.st_size != last.st_size || st.st_ino != last.st_ino) {
        std::ifstream f(cfg.ticket_keys, std::ios::binary);
        std::stringstream ss;
        ss << f.rdbuf();
        std::string data = ss.str();
        if (f && data.size() >= 48 && data.size() % 48 == 0) {
          last = st;
          if (data != last_data) {
            if (TSSslTicketKeyUpdate(data.data(), static_cast<int>(data.size())) == TS_SUCCESS) {
              last_data = data;
              TSStatIntIncrement(st_keys_loaded, 1);
              TSNote("[%s] ticket keys loaded: %zu key(s), no reload", PNAME, data.size() / 48);
            } else {
              TSError("[%s] TSSslTicketKeyUpdate refused the key file", PNAME);
            }
          }
          warned = false;
        } else if (!warned) {
          TSError("[%s] %s: not a whole number of 48-byte keys; waiting for a complete file",
                  PNAME, cfg.ticket_keys.c_str());
          warned = true;
        }
      }
    } else if (!warned) {
      TSError("[%s] %s: %s; waiting for it", PNAME, cfg.ticket_keys.c_str(), strerror(errno));
      warned = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return nullptr;
}

void
mark(const std::string &id)
{
  std::lock_guard<std::mutex> g(marks_mutex);
  if (marks.insert(id).second) {
    marks_order.push_back(id);
    if (marks_order.size() > MARKS_MAX) {
      marks.erase(marks_order.front());
      marks_order.pop_front();
    }
  }
}

bool
unmark(const std::string &id)
{
  std::lock_guard<std::mutex> g(marks_mutex);
  return marks.erase(id) > 0;
}

int
on_session(TSCont, TSEvent event, void *edata)
{
  if (applying) {
    return 0;
  }
  const TSSslSessionID *sid = static_cast<const TSSslSessionID *>(edata);
  if (sid == nullptr || sid->len == 0 || sid->len > TS_SSL_MAX_SSL_SESSION_ID_LENGTH) {
    return 0;
  }
  std::string id(sid->bytes, sid->len);
  if (event == TS_EVENT_SSL_SESSION_NEW) {
    char buf[8192];
    int len  = sizeof(buf);
    int true_len = TSSslSessionGetBuffer(sid, buf, &len);
    if (true_len <= 0 || true_len > static_cast<int>(sizeof(buf))) {
      TSStatIntIncrement(st_new_dropped, 1);
      return 0;
    }
    enqueue(Outgoing{false, std::move(id), std::string(buf, true_len)});
  } else if (event == TS_EVENT_SSL_SESSION_REMOVE) {
    mark(id);
  }
  return 0;
}

// OpenSSL's per-connection message callback: notes a fatal alert written or read. A peer that
// vanished mid-handshake is no TLS error for the farm (a node keeps such a session), but
// OpenSSL answers that EOF with a fatal decode_error alert (SSL_R_UNEXPECTED_EOF_WHILE_READING,
// just put on this thread's error queue): that alert does not count.
void
on_message(int write_p, int, int content_type, const void *buf, size_t len, SSL *ssl, void *)
{
  if (content_type == SSL3_RT_ALERT && len >= 2 &&
      static_cast<const unsigned char *>(buf)[0] == SSL3_AL_FATAL) {
    if (write_p && ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
      return;
    }
    SSL_set_ex_data(ssl, fatal_idx, reinterpret_cast<void *>(1));
    TSDebug(TAG, "a fatal alert on a connection (description %u)",
            static_cast<const unsigned char *>(buf)[1]);
  }
}

int
on_vconn(TSCont, TSEvent event, void *edata)
{
  TSVConn vc = static_cast<TSVConn>(edata);
  SSL *ssl   = reinterpret_cast<SSL *>(TSVConnSslConnectionGet(vc));
  if (ssl != nullptr) {
    if (event == TS_EVENT_VCONN_START || event == TS_EVENT_SSL_CLIENT_HELLO) {
      // the service's context, so sessions of every instance and node resume here
      SSL_set_session_id_context(ssl, reinterpret_cast<const unsigned char *>(cfg.context.data()),
                                 cfg.context.size());
      if (event == TS_EVENT_VCONN_START) {
        SSL_set_msg_callback(ssl, on_message);
      }
    } else if (event == TS_EVENT_VCONN_CLOSE) {
      SSL_SESSION *sess = SSL_get_session(ssl);
      // ended in a TLS error: what OpenSSL invalidated must not resume anywhere
      if (sess != nullptr && SSL_get_ex_data(ssl, fatal_idx) != nullptr) {
        unsigned int n      = 0;
        const unsigned char *p = SSL_SESSION_get_id(sess, &n);
        std::string id(reinterpret_cast<const char *>(p), n);
        if (n > 0 && unmark(id)) {
          TSDebug(TAG, "a session invalidated by a TLS error: REMOVE");
          enqueue(Outgoing{true, std::move(id), std::string()});
        }
      }
    }
  }
  TSVConnReenable(vc);
  return 0;
}

bool
parse_args(int argc, const char *argv[])
{
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (v == nullptr) {
      TSError("[%s] %s needs a value", PNAME, a.c_str());
      return false;
    }
    if (a == "--cache") {
      if (!parse_endpoint(v, cfg.cache)) {
        TSError("[%s] --cache %s: give IPv4:PORT", PNAME, v);
        return false;
      }
    } else if (a == "--push") {
      if (!parse_endpoint(v, cfg.push)) {
        TSError("[%s] --push %s: give IPv4:PORT", PNAME, v);
        return false;
      }
    } else if (a == "--context") {
      cfg.context = v;
    } else if (a == "--ticket-keys") {
      cfg.ticket_keys = v;
    } else if (a == "--queue") {
      cfg.queue_max = static_cast<size_t>(atol(v));
    } else {
      TSError("[%s] unknown argument %s", PNAME, a.c_str());
      return false;
    }
    ++i;
  }
  if (cfg.cache.port == 0 || cfg.push.port == 0 || cfg.context.empty() ||
      cfg.context.size() > 32 || cfg.queue_max == 0) {
    TSError("[%s] needs --cache IP:PORT --push IP:PORT --context NAME (1-32 bytes)", PNAME);
    return false;
  }
  return true;
}

// ATS's session cache and ticket key config exist only once the SSL configuration is loaded,
// after plugins are: a session inserted before is lost. So subscribing (and loading keys)
// waits until ATS's ports are ready.
int
on_ports_ready(TSCont contp, TSEvent, void *)
{
  TSThreadCreate(push_thread, nullptr);
  if (!cfg.ticket_keys.empty()) {
    TSThreadCreate(keys_thread, nullptr);
  }
  TSContDestroy(contp);
  return 0;
}

int
stat_int(const char *name)
{
  return TSStatCreate(name, TS_RECORDDATATYPE_INT, TS_STAT_NON_PERSISTENT, TS_STAT_SYNC_SUM);
}

} // namespace

void
TSPluginInit(int argc, const char *argv[])
{
  TSPluginRegistrationInfo info;
  info.plugin_name   = PNAME;
  info.vendor_name   = "sessionbus";
  info.support_email = "";
  if (TSPluginRegister(&info) != TS_SUCCESS) {
    TSError("[%s] plugin registration failed", PNAME);
    return;
  }
  if (!parse_args(argc, argv)) {
    TSError("[%s] not enabled", PNAME);
    return;
  }
  st_new_queued   = stat_int("plugin.sessionbus.sessions_queued");
  st_new_dropped  = stat_int("plugin.sessionbus.sessions_dropped");
  st_removes_sent = stat_int("plugin.sessionbus.removes_sent");
  st_inserted     = stat_int("plugin.sessionbus.peer_sessions_inserted");
  st_removed      = stat_int("plugin.sessionbus.peer_removes_applied");
  st_keys_loaded  = stat_int("plugin.sessionbus.ticket_key_loads");
  st_cache_up     = stat_int("plugin.sessionbus.cache_connected");
  st_push_up      = stat_int("plugin.sessionbus.push_connected");

  fatal_idx = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);

  TSCont session_cont = TSContCreate(on_session, nullptr);
  TSHttpHookAdd(TS_SSL_SESSION_HOOK, session_cont);
  TSCont vconn_cont = TSContCreate(on_vconn, nullptr);
  TSHttpHookAdd(TS_VCONN_START_HOOK, vconn_cont);
  TSHttpHookAdd(TS_SSL_CLIENT_HELLO_HOOK, vconn_cont);
  TSHttpHookAdd(TS_VCONN_CLOSE_HOOK, vconn_cont);

  TSThreadCreate(sender_thread, nullptr);
  TSLifecycleHookAdd(TS_LIFECYCLE_PORTS_READY_HOOK, TSContCreate(on_ports_ready, nullptr));
  TSNote("[%s] enabled: cache %s:%d, push %s:%d, context of %zu byte(s)%s", PNAME,
         cfg.cache.host.c_str(), cfg.cache.port, cfg.push.host.c_str(), cfg.push.port,
         cfg.context.size(), cfg.ticket_keys.empty() ? "" : ", ticket keys from a file");
}
