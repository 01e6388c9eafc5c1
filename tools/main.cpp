// longllama: the command-line front end. Each subcommand is a thin layer over the library
// (tools/cmd_*.cpp): parse arguments, call src/, print results to stdout (JSON with --json) and
// progress to stderr. Errors print one line naming what was wrong and exit with status 2.
#include <cstdio>

#include "cli.h"
#include "util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"longllama: LongLLaMA inference with unbounded memory"};
  app.require_subcommand(1);
  cli::Commands commands;
  cli::add_generate_commands(app, commands);
  cli::add_model_commands(app, commands);
  cli::add_bench_commands(app, commands);
  cli::add_train_commands(app, commands);
  cli::add_eval_commands(app, commands);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (const auto& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 2;
  }
  return 0;
}
