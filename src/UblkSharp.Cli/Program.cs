using System.CommandLine;
using UblkSharp.Cli.Commands;

namespace UblkSharp.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var root = new RootCommand("ublksharp: userspace block devices for Linux (ublk), written in C#.")
        {
            FeaturesCommand.Create(),
        };
        // Our own handler gives one clear line per failure instead of a stack trace.
        var config = new InvocationConfiguration { EnableDefaultExceptionHandler = false };
        return CliErrors.Run(() => root.Parse(args).Invoke(config));
    }
}
