using System.CommandLine;
using System.CommandLine.Help;
using UblkSharp.Cli.Commands;
using UblkSharp.Cli.Logging;

namespace UblkSharp.Cli;

public static class Program
{
    /// <summary>The command line as given, for re-running it as a daemon.</summary>
    internal static string[] Arguments { get; private set; } = [];

    public static int Main(string[] args)
    {
        Arguments = args;
        // Before any child is started: only this process speaks for a systemd service.
        SystemdNotify.TakeFromEnvironment();
        var logLevel = new Option<string>("--log-level")
        {
            Description = $"What to log: {string.Join('|', CliLog.LevelNames)} (default information, or ${CliLog.Variable}); daemons started from here log at it too",
            HelpName = "LEVEL",
            Recursive = true,
        };
        // Named, not RootCommand (which takes the executable's name, UblkSharp.Cli): the usage line says ublksharp.
        var root = new Command("ublksharp", "ublksharp: userspace block devices for Linux (ublk), written in C#.")
        {
            new HelpOption(),
            new VersionOption(),
            logLevel,
            AddCommand.Create(),
            DelCommand.Create(),
            RecoverCommand.Create(),
            UpgradeCommand.Create(),
            ResizeCommand.Create(),
            MountCommand.Create(),
            ListCommand.Create(),
            FeaturesCommand.Create(),
            ServeCommand.Create(),
            CowCommand.Create(),
            Qcow2Command.Create(),
            RunCommand.Create(),
            StatsCommand.Create(),
            SetupUnprivilegedCommand.Create(),
            SetupUnprivilegedCommand.CreateChown(),
        };
        // Our own handler gives one clear line per failure instead of a stack trace.
        var config = new InvocationConfiguration { EnableDefaultExceptionHandler = false };
        var parse = root.Parse(args);
        // Before the command runs, so that everything it logs (the library too) obeys the level.
        // A command line that does not parse (--log-level without a value) is reported by its invocation.
        var option = parse.Errors.Count == 0 ? parse.GetValue(logLevel) : null;
        var variable = Environment.GetEnvironmentVariable(CliLog.Variable);
        var level = Microsoft.Extensions.Logging.LogLevel.Information;
        // The option wins; an empty variable counts as unset, as shells make it easy to leave one so.
        if ((option is not null && !CliLog.TryParseLevel(option, out level))
            || (option is null && !string.IsNullOrEmpty(variable) && !CliLog.TryParseLevel(variable, out level)))
        {
            CliLog.Failure($"bad {(option is not null ? "--log-level" : CliLog.Variable)} '{option ?? variable}': use one of {string.Join(", ", CliLog.LevelNames)}");
            return CliErrors.Usage;
        }
        CliLog.Configure(level);
        return CliErrors.Run(() => parse.Invoke(config));
    }
}
