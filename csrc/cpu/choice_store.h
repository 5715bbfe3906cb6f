// The file that keeps the cpp backend's timed GEMM choices for every process on one machine.
//
// A choice made by timing depends on the machine's mood at that moment, and two candidates round
// differently in the last bits: two runs of the same script could pick differently and train
// apart. So the first process to time a GEMM and shape class writes its pick here, and every
// later process (and any running at the same time) reads it instead of timing again. The file is
// named by Python for the CPU model, torch and package versions (msplora_kernels/ops/native.py);
// a row also carries the thread count, which changes what is fastest.
//
// Rows are tab-separated: gemm, dtype, cpu_gemm mode, threads, m, k, n (shape classes), the
// candidate's name, and the timings that chose it. The last row for a key wins. A reader holds
// an exclusive flock while it looks a key up and, on a miss, while it times and appends, so two
// processes that miss together still end with one pick.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstdio>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>

namespace msplora {
namespace choice_store {

// The file in use; empty: choices live in this process only.
inline std::mutex& path_mutex() {
  static std::mutex m;
  return m;
}

inline std::string& path_storage() {
  static std::string path;
  return path;
}

inline void set_path(const std::string& path) {
  std::lock_guard<std::mutex> lock(path_mutex());
  path_storage() = path;
}

inline std::string path() {
  std::lock_guard<std::mutex> lock(path_mutex());
  return path_storage();
}

// A row's key fields, tab-joined: what must match for a stored pick to apply.
inline std::string row_key(const std::string& gemm, const std::string& dtype, int mode, int threads, int64_t m,
                           int64_t k, int64_t n) {
  std::ostringstream out;
  out << gemm << '\t' << dtype << '\t' << mode << '\t' << threads << '\t' << m << '\t' << k << '\t' << n;
  return out.str();
}

struct Stored {
  std::string candidate;
  std::string timings;
};

// How many LockedFiles the calling thread holds. A choice can be made while another is timed
// (dT and dB in one pass against each on its own choice), and a second flock from the same
// thread would wait for the first forever: only the outermost one locks.
inline int& held_by_this_thread() {
  thread_local int depth = 0;
  return depth;
}

// The file, opened and locked for as long as this object lives; `ok()` is false where it cannot
// be opened (a read-only home, say): the choice is then made and kept in this process only.
class LockedFile {
 public:
  explicit LockedFile(const std::string& path) {
    if (path.empty()) return;
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) return;
    locks_ = held_by_this_thread() == 0;
    if (locks_ && ::flock(fd_, LOCK_EX) != 0) {
      ::close(fd_);
      fd_ = -1;
      return;
    }
    ++held_by_this_thread();
  }
  ~LockedFile() {
    if (fd_ < 0) return;
    --held_by_this_thread();
    if (locks_) ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
  LockedFile(const LockedFile&) = delete;
  LockedFile& operator=(const LockedFile&) = delete;

  bool ok() const { return fd_ >= 0; }

  // The last row stored for `key`.
  std::optional<Stored> find(const std::string& key) const {
    std::optional<Stored> found;
    if (!ok()) return found;
    std::string text;
    char buffer[4096];
    ::lseek(fd_, 0, SEEK_SET);
    for (ssize_t got; (got = ::read(fd_, buffer, sizeof(buffer))) > 0;) text.append(buffer, static_cast<size_t>(got));
    std::istringstream lines(text);
    const std::string prefix = key + '\t';
    for (std::string line; std::getline(lines, line);) {
      if (line.compare(0, prefix.size(), prefix) != 0) continue;
      const std::string rest = line.substr(prefix.size());
      const size_t tab = rest.find('\t');
      found = Stored{rest.substr(0, tab), tab == std::string::npos ? "" : rest.substr(tab + 1)};
    }
    return found;
  }

  // Appends one row; a partial write (a full disk) is cut back so that no torn row stays.
  void append(const std::string& key, const std::string& candidate, const std::string& timings) const {
    if (!ok()) return;
    const std::string row = key + '\t' + candidate + '\t' + timings + '\n';
    const off_t end = ::lseek(fd_, 0, SEEK_END);
    if (::write(fd_, row.data(), row.size()) != static_cast<ssize_t>(row.size()) && end >= 0) {
      if (::ftruncate(fd_, end) != 0) return;
    }
  }

 private:
  int fd_ = -1;
  bool locks_ = false;
};

}  // namespace choice_store
}  // namespace msplora
