using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Cli;

/// <summary>Turns expected failures into one clear line on stderr and a non-zero exit, never a stack trace.</summary>
internal static class CliErrors
{
    public const int Failure = 1;
    public const int Unavailable = 2;

    public static int Run(Func<int> action)
    {
        try
        {
            return action();
        }
        catch (UblkUnavailableException e)
        {
            return Fail(e.Message, Unavailable);
        }
        catch (ErrnoException e)
        {
            return Fail(e.Message, Failure);
        }
        catch (TimeoutException e)
        {
            return Fail(e.Message, Failure);
        }
        catch (IOException e)
        {
            return Fail(e.Message, Failure);
        }
        catch (UnauthorizedAccessException e)
        {
            return Fail(e.Message, Failure);
        }
    }

    private static int Fail(string message, int code)
    {
        Console.Error.WriteLine($"ublksharp: {message}");
        return code;
    }
}
