// EnvironmentFlagsTests: the table of `PROGRESS_RELAY_<FLAG>` variables checked against the
// flags swift-argument-parser reads (its JSON help dump), so neither can drift: every option and
// flag of `serve` has its variable, and every variable names a flag of the right kind.

import ArgumentParser
import Foundation
import Testing

@testable import progress_relay

/// A command's named arguments as the parser describes them: long name, and how it is given.
private func declaredFlags(of command: any ParsableCommand.Type) throws -> [String: EnvironmentFlags.Kind] {
    let dump = try #require(try JSONSerialization.jsonObject(with: Data(command._dumpHelp().utf8)) as? [String: Any])
    let info = try #require(dump["command"] as? [String: Any])
    var result: [String: EnvironmentFlags.Kind] = [:]
    for argument in info["arguments"] as? [[String: Any]] ?? [] {
        let names = (argument["names"] as? [[String: Any]] ?? []).filter { $0["kind"] as? String == "long" }
        guard let name = names.first?["name"] as? String else { continue }  // positional
        // The parser's own flags are not the relay's.
        if name == "help" || name == "version" || name == "experimental-dump-help" { continue }
        let repeating = argument["isRepeating"] as? Bool ?? false
        switch argument["kind"] as? String {
        case "flag": result[name] = .toggle
        case "option": result[name] = repeating ? .repeatable : .single
        default: continue
        }
    }
    return result
}

private func table(_ subcommand: String) throws -> [String: EnvironmentFlags.Kind] {
    let entries = try #require(EnvironmentFlags.flags[subcommand])
    let table = Dictionary(entries.map { ($0.name, $0.kind) }, uniquingKeysWith: { first, _ in first })
    #expect(table.count == entries.count, "a flag is listed twice for \(subcommand)")
    return table
}

@Suite struct EnvironmentFlagsTests {
    @Test func everyFlagOfServeHasItsVariable() throws {
        let declared = try declaredFlags(of: ServeCommand.self)
        let listed = try table("serve")
        #expect(declared.count > 30, "the help dump was read")
        for (name, kind) in declared.sorted(by: { $0.key < $1.key }) {
            #expect(listed[name] != nil, "--\(name) has no PROGRESS_RELAY_ variable")
            if let listedKind = listed[name] { #expect(listedKind == kind, "--\(name) is \(kind), listed as \(listedKind)") }
        }
    }

    @Test(arguments: [
        ("serve", ServeCommand.self as any ParsableCommand.Type), ("emit", EmitCommand.self),
        ("token", TokenCommand.self), ("watch", WatchCommand.self),
    ])
    func everyVariableNamesAFlagOfTheRightKind(subcommand: String, command: any ParsableCommand.Type) throws {
        let declared = try declaredFlags(of: command)
        for (name, kind) in try table(subcommand).sorted(by: { $0.key < $1.key }) {
            #expect(declared[name] != nil, "PROGRESS_RELAY_ variable for --\(name), which \(subcommand) does not have")
            if let declaredKind = declared[name] {
                #expect(declaredKind == kind, "\(subcommand) --\(name) is \(declaredKind), listed as \(kind)")
            }
        }
    }

    @Test func everySubcommandInTheTableExists() {
        let names = ProgressRelayCommand.configuration.subcommands.map { $0._commandName }
        #expect(Set(EnvironmentFlags.flags.keys).isSubset(of: Set(names)))
    }

    @Test func aVariableBecomesItsFlagUnlessTheCommandLineGivesIt() {
        let environment = [
            "PROGRESS_RELAY_HISTORY": "5", "PROGRESS_RELAY_MAX_EVENT_BYTES": "100", "PROGRESS_RELAY_SOCKET": "",
        ]
        let (arguments, variables) = EnvironmentFlags.apply(
            to: ["serve", "--history=9"], environment: environment)
        #expect(arguments == ["serve", "--history=9", "--max-event-bytes", "100"])
        #expect(variables == ["--max-event-bytes": "PROGRESS_RELAY_MAX_EVENT_BYTES"])
    }

    @Test func aRepeatableVariableIsAListAndAToggleIsAYes() {
        let environment = [
            "PROGRESS_RELAY_GRANT": "user:{sub}:*, public:*\nteam:*,,", "PROGRESS_RELAY_DEV": "yes",
            "PROGRESS_RELAY_ALLOW_TOKENS_WITHOUT_EXP": "0",
        ]
        let (arguments, _) = EnvironmentFlags.apply(to: ["serve"], environment: environment)
        let grants = zip(arguments, arguments.dropFirst()).filter { $0.0 == "--grant" }.map(\.1)
        #expect(grants == ["user:{sub}:*", "public:*", "team:*"])
        #expect(arguments.contains("--dev"))
        #expect(!arguments.contains("--allow-tokens-without-exp"))
    }

    @Test func anotherSubcommandTakesOnlyItsOwnVariables() {
        let environment = ["PROGRESS_RELAY_SOCKET": "/tmp/s", "PROGRESS_RELAY_HISTORY": "5"]
        #expect(EnvironmentFlags.apply(to: ["emit", "--topic", "t"], environment: environment).arguments
            == ["emit", "--topic", "t", "--socket", "/tmp/s"])
        #expect(EnvironmentFlags.apply(to: ["--help"], environment: environment).arguments == ["--help"])
    }

    @Test func anErrorNamesTheVariableItsValueCameFrom() {
        let variables = ["--history": "PROGRESS_RELAY_HISTORY"]
        #expect(
            EnvironmentFlags.attribute("--history must be a number", variables: variables)
                == "--history must be a number (the value comes from PROGRESS_RELAY_HISTORY)")
        #expect(EnvironmentFlags.attribute("--history-bytes is wrong", variables: variables) == "--history-bytes is wrong")
    }
}
