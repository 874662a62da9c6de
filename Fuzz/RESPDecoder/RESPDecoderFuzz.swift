// resp-fuzz: the RESPDecoder under libFuzzer, and a replayer of its inputs.
//
// Built by `scripts/fuzz` (see there) with coverage instrumentation and
// `-D RESP_FUZZ`, `main` hands the command line to libFuzzer, which calls
// `RESPDecoderInvariants.check` with each input it generates. Built plainly, as
// part of every `swift build`, it replays files instead: `swift run resp-fuzz
// Fuzz/corpus/resp crash-1234...` runs the same checks on each file (or each
// file of a directory), uninstrumented and with a readable backtrace, which is
// how a crash found by the fuzzer is reproduced and debugged.
//
// Why libFuzzer is called through `LLVMFuzzerRunDriver` from a `main` of our own
// instead of the usual `@_cdecl("LLVMFuzzerTestOneInput")` plus libFuzzer's
// `main`: SwiftPM links every executable with `--defsym main=<module>_main`, so
// an executable target with no `main` of its own fails to link, fuzzing or not
// (and libFuzzer's `main` would clash with it). With our own `main` the target
// is an ordinary executable that builds, links and stays type-checked in plain
// builds, and the fuzz build only adds instrumentation and libFuzzer's runtime
// without its `main` (libclang_rt.fuzzer_no_main).

#if RESP_FUZZ
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// libFuzzer's entry point for programs that have a `main` of their own.
/// Declared with `@_extern(c)` (`-enable-experimental-feature Extern`, passed by scripts/fuzz).
@_extern(c, "LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ testOneInput: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32

@main
enum RESPFuzz {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(
            LLVMFuzzerRunDriver(&argc, &argv) { data, size in
                RESPDecoderInvariants.check(Array(UnsafeBufferPointer(start: data, count: size)))
                return 0
            })
    }
}

#else
import Foundation

@main
enum RESPFuzz {
    static func main() {
        let paths = CommandLine.arguments.dropFirst()
        guard !paths.isEmpty, !paths.contains(where: { $0.hasPrefix("-") }) else {
            print(
                """
                usage: resp-fuzz FILE_OR_DIRECTORY...
                Runs the RESPDecoder fuzz checks on each file: a crash artifact, or a corpus.
                (This is the plain build; scripts/fuzz builds the libFuzzer one.)
                """)
            exit(2)
        }
        var files: [String] = []
        for path in paths {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
                print("resp-fuzz: no such file: \(path)")
                exit(2)
            }
            if isDirectory.boolValue {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
                files += names.sorted().map { path + "/" + $0 }
            } else {
                files.append(path)
            }
        }
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else {
                print("resp-fuzz: cannot read \(file)")
                exit(2)
            }
            RESPDecoderInvariants.check(Array(data))  // traps, saying what, on a violation
        }
        print("resp-fuzz: \(files.count) inputs, every check held")
    }
}
#endif
