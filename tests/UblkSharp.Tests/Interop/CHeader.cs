using System.Diagnostics;
using System.Text;

namespace UblkSharp.Tests.Interop;

/// <summary>Compiles and runs a small C program against the installed kernel headers and returns its "name value" lines.</summary>
internal static class CHeader
{
    public static Dictionary<string, ulong> Evaluate(IEnumerable<string> includes, IEnumerable<(string Name, string Expression)> values)
    {
        var dir = Directory.CreateTempSubdirectory("ublksharp-layout-");
        try
        {
            var src = new StringBuilder();
            foreach (var inc in includes)
            {
                src.AppendLine($"#include <{inc}>");
            }
            src.AppendLine("#include <stddef.h>\n#include <stdio.h>\nint main(void) {");
            foreach (var (name, expr) in values)
            {
                src.AppendLine($"  printf(\"%s %llu\\n\", \"{name}\", (unsigned long long)({expr}));");
            }
            src.AppendLine("  return 0;\n}");
            var c = Path.Combine(dir.FullName, "probe.c");
            var exe = Path.Combine(dir.FullName, "probe");
            File.WriteAllText(c, src.ToString());
            Run("gcc", $"-std=gnu11 -o {exe} {c}");
            var output = Run(exe, "");
            return output.Split('\n', StringSplitOptions.RemoveEmptyEntries)
                .Select(l => l.Split(' '))
                .ToDictionary(p => p[0], p => ulong.Parse(p[1], System.Globalization.CultureInfo.InvariantCulture));
        }
        finally
        {
            dir.Delete(true);
        }
    }

    private static string Run(string file, string args)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEnd();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != 0)
        {
            throw new InvalidOperationException($"{file} {args} failed ({p.ExitCode}): {stderr}");
        }
        return stdout;
    }
}
