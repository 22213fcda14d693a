using UblkSharp.Cli.Logging;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli;

/// <summary>Turns expected failures into one clear line on stderr and a non-zero exit, never a stack trace.</summary>
internal static class CliErrors
{
    public const int Failure = 1;
    public const int Unavailable = 2;

    /// <summary>A bad value of a global setting (--log-level), as a shell gives for misuse.</summary>
    public const int Usage = 2;

    public static int Run(Func<int> action)
    {
        try
        {
            return action();
        }
        catch (Exception e) when (IsExpected(e))
        {
            CliLog.Failure(Describe(e));
            return e is UblkUnavailableException ? Unavailable : Failure;
        }
    }

    public static bool IsExpected(Exception e) => e is UblkUnavailableException or ErrnoException or TimeoutException or IOException
        or UnauthorizedAccessException or ArgumentException or FormatException or DaemonFailedException
        or RecoveryRefusedException or NotSupportedException;

    public static string Describe(Exception e) => e switch
    {
        // Option validation messages carry a "(Parameter 'x')" suffix meant for programmers.
        ArgumentException a when a.ParamName is not null => a.Message.Replace($" (Parameter '{a.ParamName}')", "", StringComparison.Ordinal),
        _ => e.Message,
    };
}
