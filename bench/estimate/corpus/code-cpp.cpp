#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace demo {

// A fixed-capacity ring buffer of latency samples with an exact percentile query.
class LatencyWindow {
 public:
  explicit LatencyWindow(std::size_t capacity) : samples_(capacity, 0) {}

  void add(std::uint32_t micros) {
    samples_[next_] = micros;
    next_ = (next_ + 1) % samples_.size();
    if (count_ < samples_.size()) ++count_;
  }

  // p in [0, 100]; returns 0 when empty.
  std::uint32_t percentile(double p) const {
    if (count_ == 0) return 0;
    std::vector<std::uint32_t> sorted(samples_.begin(), samples_.begin() + count_);
    std::sort(sorted.begin(), sorted.end());
    auto rank = static_cast<std::size_t>(p / 100.0 * (count_ - 1) + 0.5);
    return sorted[std::min(rank, count_ - 1)];
  }

  std::string summary() const {
    return "p50=" + std::to_string(percentile(50)) + "us p99=" + std::to_string(percentile(99)) + "us";
  }

 private:
  std::vector<std::uint32_t> samples_;
  std::size_t next_ = 0;
  std::size_t count_ = 0;
};

}  // namespace demo
