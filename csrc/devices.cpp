// Device-name parsing shared by the latent ops and the communicator cache (no torch headers).
#include "common.h"

#include <cctype>

namespace tetri {

DeviceName parse_device(const std::string& name) {
  DeviceName dev;
  std::string kind = name;
  std::string index_text;
  const auto colon = name.find(':');
  if (colon != std::string::npos) {
    kind = name.substr(0, colon);
    index_text = name.substr(colon + 1);
  }
  if (kind == "cpu") {
    dev.is_cuda = false;
  } else if (kind == "cuda") {
    dev.is_cuda = true;
    TETRI_CHECK_ARG(!index_text.empty(), "device '", name,
                    "' needs an index, e.g. 'cuda:0' (a bare 'cuda' means a different GPU in each thread)");
  } else {
    throw std::invalid_argument(str_cat("unknown device '", name, "': expected 'cpu:N' or 'cuda:N'"));
  }
  if (!index_text.empty()) {
    bool digits = index_text.size() <= 6;
    for (char c : index_text) digits = digits && std::isdigit(static_cast<unsigned char>(c));
    TETRI_CHECK_ARG(digits, "device '", name, "' has a bad index: expected 'cpu:N' or 'cuda:N' with N >= 0");
    dev.index = std::stoi(index_text);
  }
  dev.text = str_cat(kind, ":", dev.index);
  return dev;
}

std::string join_devices(const std::vector<std::string>& devices) {
  std::string out = "(";
  for (size_t i = 0; i < devices.size(); ++i) {
    if (i) out += ", ";
    out += devices[i];
  }
  return out + ")";
}

}  // namespace tetri
