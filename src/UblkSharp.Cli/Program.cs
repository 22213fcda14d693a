using System.CommandLine;
using System.CommandLine.Help;
using UblkSharp.Cli.Commands;

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
        // Named, not RootCommand (which takes the executable's name, UblkSharp.Cli): the usage line says ublksharp.
        var root = new Command("ublksharp", "ublksharp: userspace block devices for Linux (ublk), written in C#.")
        {
            new HelpOption(),
            new VersionOption(),
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
            RunCommand.Create(),
            StatsCommand.Create(),
        };
        // Our own handler gives one clear line per failure instead of a stack trace.
        var config = new InvocationConfiguration { EnableDefaultExceptionHandler = false };
        return CliErrors.Run(() => root.Parse(args).Invoke(config));
    }
}
